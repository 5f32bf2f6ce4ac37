"""Errors a trainer user can act on: data errors name file and line, the classify eval split is
stratified, every option is checked before the first step (and before the base loads), AROMA refuses a
schedule it would not follow, AdaLoRA's file never exceeds its budget, the adapter is checked against
the server's max rank, and --help documents every flag and every method option."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest

from trainer.cli import build_parser, main
from trainer.data import build_datasets, read_records, split_records, toy_records
from trainer.export import build_adapter, fit_problem, planned_width
from trainer.loop import TrainConfig, train
from trainer.methods.base import REGISTRY, make_config
from trainer.options import OPTION_HELP
from trainer.schedules import make_schedule


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_data_errors_name_the_file_and_line(tmp_path, tiny_bert):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n\n{"text": "b"}\n{"text": "c", "label": "y"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: field 'label' is missing"):
        build_datasets("classify", tiny_bert.tokenizer, read_records(data), [], 16)
    held = tmp_path / "held.csv"
    held.write_text('text,label\n"two\nlines",x\nok,zz\n')  # a quoted field spans lines 2-3: the next row is line 4
    with pytest.raises(ValueError, match=r"held\.csv:4: label 'zz' is not among"):
        build_datasets("classify", tiny_bert.tokenizer, [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],
                       read_records(held), 16)
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_records(tmp_path / "missing.jsonl")


def test_classify_eval_split_is_stratified():
    records = [{"text": str(i), "label": lab} for i, lab in enumerate(["a"] * 20 + ["b"] * 6 + ["c"] * 4)]
    train_part, eval_part = split_records(records, 0.2, seed=3, stratify="label")
    assert Counter(r["label"] for r in eval_part) == {"a": 4, "b": 1, "c": 1}  # 6 = round(0.2 * 30), by share
    assert len(train_part) + len(eval_part) == 30 and not {id(r) for r in train_part} & {id(r) for r in eval_part}
    for seed in range(20):  # every seed keeps every class, which a plain shuffle does not
        assert {r["label"] for r in split_records(records, 0.1, seed=seed, stratify="label")[1]} >= {"a", "b"}


BAD_OPTIONS = [
    ("adalora", {"delta_t": 0}, "delta_t must be >= 1"),
    ("adalora", {"rank": 8, "init_r": 4}, "init_r (4) must be >= the target rank (8)"),
    ("adalora", {"beta1": 1.5}, "beta1 must be in [0.0, 1.0]"),
    ("aroma", {"check_every": 0}, "check_every must be >= 1"),
    ("aroma", {"max_inner_steps": 0}, "max_inner_steps must be >= 1"),
    ("aroma", {"window": 0, "patience": 0}, "window must be >= 1, got 0; patience must be >= 1"),
    ("aroma", {"moment_prune": 2.0}, "moment_prune must be in [0.0, 1.0]"),
    ("mor", {"num_experts": 0}, "num_experts must be >= 1"),
    ("edora", {"r_std": -1.0}, "r_std must be >= 0.0"),
    ("lora", {"dropout": 1.0, "alpha": 0.0}, "dropout must be in [0, 1), got 1.0; alpha must be > 0"),
]


@pytest.mark.parametrize("method,options,message", BAD_OPTIONS)
def test_every_bad_option_is_named_before_anything_runs(method, options, message, tmp_path, capsys):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make_config(method, **options)
    argv = ["--method", method, "--model", str(tmp_path / "no-such-model"), "--task", "classify", "--data",
            str(tmp_path / "no-such-data.jsonl"), "--out", str(tmp_path / "a.safetensors"), "--no-progress"]
    for key, value in options.items():
        argv += ["--set", f"{key}={value}"]
    assert main(argv) == 2  # refused before the (missing) base or data are even looked at
    assert message in capsys.readouterr().err


def test_adalora_keeps_its_defaults_valid():
    assert make_config("adalora", alpha=0.0).alpha == 0.0  # alpha <= 0 means scaling = r (PEFT)


def test_aroma_refuses_a_warmup_ratio_or_scheduler_it_would_ignore(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", toy_records("classify", 16))
    for flags in (["--warmup-ratio", "0.1"], ["--lr-scheduler", "cosine"]):
        assert main(["--method", "aroma", "--model", "tiny-bert", "--task", "classify", "--data", str(data),
                     "--out", str(tmp_path / "a.safetensors"), "--max-steps", "2", "--no-progress", *flags]) == 2
        assert "aroma brings its own learning-rate schedule" in capsys.readouterr().err
    assert not (tmp_path / "a.safetensors").exists()


def test_adalora_tfinal_zero_still_applies_the_final_mask(tiny_llama):
    base = dataclasses.replace(tiny_llama, model=__import__("copy").deepcopy(tiny_llama.model))
    train_set, _, labels = build_datasets("classify", base.tokenizer, toy_records("classify", 16), [], 32)
    # tfinal = 0 (PEFT's default) and a delta_t longer than the run: only the forced final mask can prune
    options = {"rank": 2, "init_r": 4, "tinit": 0, "tfinal": 0, "delta_t": 100}
    cfg = TrainConfig(method="adalora", task="classify", method_options=options, lr=1e-2, max_steps=5,
                      batch_size=8, progress=False)
    result = train(base, train_set, train_set, cfg, labels)
    adapter = build_adapter(base, result, "adalora", "classify")
    assert sum(adapter.meta.ranks.values()) == 2 * len(result.layers)  # the target budget, not init_r's
    assert result.controller.total_rank() == 2 * len(result.layers)


def test_the_adapter_is_checked_against_the_servers_max_rank(tmp_path, capsys):
    assert planned_width(make_config("mor", rank=16, num_experts=8)) == 128
    assert planned_width(make_config("adalora", rank=8)) == 12
    assert fit_problem("lora", 64, 64, "x") is None
    data = str(tmp_path / "d.jsonl")
    cases = [(["--method", "mor", "--rank", "16"], "needs 128 rank rows per module (rank x num_experts)",
              "--set num_experts, or start the server with --max-rank 128"),
             (["--method", "adalora", "--set", "init_r=96"], "needs 96 rank rows per module (init_r)", "--set init_r"),
             (["--method", "lora", "--rank", "32", "--server-max-rank", "16"], "more than the server's max rank 16",
              "--server-max-rank 32 here")]
    for flags, what, fix in cases:
        assert main([*flags, "--model", "tiny-bert", "--task", "classify", "--data", data,
                     "--out", str(tmp_path / "a.safetensors")]) == 2
        err = capsys.readouterr().err
        assert what in err and fix in err, err


def test_help_documents_every_flag_and_every_method_option(capsys):
    parser = build_parser()
    undocumented = [a.option_strings for a in parser._actions if a.help in (None, "") and a.dest != "help"]
    assert not undocumented
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for name, layer in REGISTRY.items():
        assert f"\n  {name}:\n" in text
        for f in dataclasses.fields(layer.Config):
            assert OPTION_HELP.get(f.name), f"{name}.{f.name} has no help line"
            assert f"    {f.name} (" in text


def test_lr_schedulers():
    cosine = make_schedule("cosine", warmup=2, total=10)
    assert [cosine(s) for s in (0, 1, 2, 6, 10)] == pytest.approx([0, 0.5, 1.0, 0.5, 0.0])
    constant = make_schedule("constant", warmup=2, total=10)
    assert [constant(s) for s in (0, 1, 2, 9)] == [0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="--lr-scheduler must be one of"):
        TrainConfig(method="lora", lr_scheduler="step")
    with pytest.raises(ValueError, match="--batch-size must be >= 1, got 0; --warmup-ratio must be in"):
        TrainConfig(method="lora", batch_size=0, warmup_ratio=1.5)
