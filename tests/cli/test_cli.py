"""The rizz CLI: help, presets, end-to-end train/generate/eval, and bad input."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from rizzearch.cli import COMMANDS, main, parse_command

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ["--model_config.n_layer", "1", "--model_config.d_model", "32", "--model_config.n_head", "2",
        "--data.tokenizer", "byte", "--data.seq_len", "32", "--data.eval_batches", "2",
        "--train.steps", "4", "--train.batch_size", "4", "--train.log_every", "2", "--progress", "false"]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command.split(), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: rizz" in out and "--config" in out


def test_unknown_command_and_group(capsys):
    assert main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["rag"]) == 2
    assert "index" in capsys.readouterr().err


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_presets_validate(preset):
    header = preset.read_text().splitlines()[0]
    m = re.match(r"#\s*command:\s*(.+)", header)
    assert m, f"{preset.name}: first line must be '# command: <rizz command>'"
    parse_command(m.group(1).strip(), ["--config", str(preset)])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    return run


def test_train_writes_one_run_folder(trained_run):
    for name in ("config.yaml", "metrics.jsonl", "tokenizer.json", "checkpoints/latest.json", "data/meta.json"):
        assert (trained_run / name).is_file(), name
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_bpb" in r for r in rows)
    assert "steps: 4" in (trained_run / "config.yaml").read_text()


def test_generate_and_eval_from_the_run(trained_run, capsys):
    assert main(["generate", "--checkpoint", str(trained_run), "--prompt", "ROMEO:", "--max_new_tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert main(["eval", "--checkpoint", str(trained_run), "--seq_len", "32", "--max_batches", "2"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["val_loss"] > 0


def test_resume_continues_a_cli_run(trained_run, tmp_path):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(trained_run, run)
    args = [a if a != "4" or i == 0 else a for i, a in enumerate(TINY)]
    args[args.index("--train.steps") + 1] = "6"
    assert main(["train", "--out", str(run), "--resume", "true", *args]) == 0
    assert json.loads((run / "checkpoints/latest.json").read_text())["step"] == 6


def test_unknown_key_and_wrong_type_name_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(bad)])
    assert e.value.code != 0
    assert "stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--train.steps", "many"])
    assert "train.steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # model_config is typed by the model's config: a parse error, exit status 2
        main(["train", "--out", str(tmp_path / "x"), *TINY, "--model_config.d_modle", "3"])
    assert e.value.code == 2
    assert "d_modle" in capsys.readouterr().err


def test_missing_and_empty_corpus(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "a"), *TINY, "--data.source", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", "--out", str(tmp_path / "b"), *TINY, "--data.source", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err


def test_existing_checkpoints_are_never_overwritten(trained_run, capsys):
    before = digests(trained_run / "checkpoints")
    assert main(["train", "--out", str(trained_run), *TINY]) == 2
    assert "already has checkpoints" in capsys.readouterr().err
    assert digests(trained_run / "checkpoints") == before


def test_corrupted_checkpoint_is_reported(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(trained_run, run)
    ckpt = next((run / "checkpoints").glob("step_*"))
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = digests(run / "checkpoints")
    assert main(["generate", "--checkpoint", str(run), "--max_new_tokens", "2"]) == 2
    assert "corrupted or truncated" in capsys.readouterr().err
    assert digests(run / "checkpoints") == before


def test_truncated_train_state_stops_resume(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(trained_run, run)
    state = next((run / "checkpoints").glob("step_*")) / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    before = digests(run / "checkpoints")
    args = list(TINY)
    args[args.index("--train.steps") + 1] = "6"
    assert main(["train", "--out", str(run), "--resume", "true", *args]) == 2
    assert "train_state.pt" in capsys.readouterr().err
    assert digests(run / "checkpoints") == before


def test_tokenizer_vocabulary_mismatch(trained_run, tmp_path, capsys):
    import shutil

    from rizzearch.data.tokenizer import train_bpe

    run = tmp_path / "r"
    shutil.copytree(trained_run, run)
    train_bpe(["some other text " * 50], vocab_size=300).save(run / "tokenizer.json")
    before = digests(run / "checkpoints")
    assert main(["generate", "--checkpoint", str(run), "--max_new_tokens", "2"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert digests(run / "checkpoints") == before


@pytest.mark.parametrize("args", [
    ["Who wrote it?", "--k", "6", "--generator", "extractive"],
    ["--k", "6", "Who wrote it?", "--generator", "extractive"],
    ["--k", "6", "--generator", "extractive", "Who wrote it?"],
    ["--question", "Who wrote it?", "--k", "6", "--generator", "extractive"],
])
def test_rag_ask_question_is_positional_anywhere_or_an_option(args):
    _, _, cfg = parse_command("rag ask", args)
    assert cfg.question == "Who wrote it?" and cfg.k == 6 and cfg.generator == "extractive"


@pytest.mark.parametrize("args, study, out", [
    (["rwkv"], "rwkv", None),
    (["rwkv", "--out", "x"], "rwkv", "x"),
    (["--out", "x", "rwkv"], "rwkv", "x"),
    (["--study", "rwkv", "--out", "x"], "rwkv", "x"),
    (["--out", "x"], None, "x"),
])
def test_reproduce_study_is_positional_anywhere_or_an_option(args, study, out):
    _, _, cfg = parse_command("reproduce", args)
    assert (cfg.study, cfg.out) == (study, out)


@pytest.mark.parametrize("args, names", [
    (["a", "b", "--timeout_s", "5"], ["a", "b"]),
    (["--timeout_s", "5", "a", "b"], ["a", "b"]),
    (["train_throughput", "--timeout_s", "5"], ["train_throughput"]),
    (["--names", '["a"]', "--timeout_s", "5"], ["a"]),
    (["--timeout_s", "5"], None),
])
def test_bench_names_are_positional_anywhere_or_an_option(args, names):
    _, _, cfg = parse_command("bench", args)
    assert cfg.names == names and cfg.timeout_s == 5


@pytest.mark.parametrize("command, extra", [
    ("generate", ["--prompt", "Hi"]), ("chat", ["--system", "Be brief."]), ("eval", ["--seq_len", "64"]),
    ("export", ["--out", "hf"]), ("memorization", ["--out", "m"]),
])
def test_the_model_is_positional_anywhere_or_an_option(command, extra):
    """``rizz generate RUN --prompt ...`` (and eval, export, chat, memorization) read RUN as --checkpoint,
    before or after the options; the option form is unchanged."""
    for args in (["runs/x", *extra], [*extra, "runs/x"], ["--checkpoint", "runs/x", *extra]):
        _, _, cfg = parse_command(command, args)
        assert cfg.checkpoint == "runs/x"
        assert str(getattr(cfg, extra[0][2:])) == extra[1]


def test_positionals_keep_yaml_values_and_reject_extra_values(tmp_path, capsys):
    cfg_file = tmp_path / "b.yaml"
    cfg_file.write_text("names: [rwkv]\ntimeout_s: 7\n")
    assert parse_command("bench", ["--config", str(cfg_file)])[2].names == ["rwkv"]  # an absent positional changes nothing
    assert parse_command("bench", ["--config", str(cfg_file), "xlstm"])[2].names == ["xlstm"]
    with pytest.raises(SystemExit):
        parse_command("reproduce", ["rwkv", "xlstm"])
    assert "xlstm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_command("train", ["stray"])
    assert "stray" in capsys.readouterr().err


def test_rag_ask_positional_after_options_end_to_end(tmp_path, capsys):
    """The reported failure: ``rizz rag ask --generator X "question"`` said "unrecognized arguments"."""
    rc = main(["rag", "ask", "--generator", "extractive", "--mode", "bm25", "--index", str(tmp_path / "i.sqlite"),
               "--as_json", "true", "What is hearsay?"])
    assert rc == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["question"] == "What is hearsay?"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from rizzearch.rag.index import default_index_path
    from rizzearch.runs import cache_dir

    monkeypatch.delenv("RIZZ_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("kernels") == tmp_path / "xdg" / "rizzearch" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "rizzearch"
    monkeypatch.setenv("RIZZ_CACHE", str(tmp_path / "c"))  # read at each call, not at import
    assert cache_dir("native") == tmp_path / "c" / "native"
    assert default_index_path() == tmp_path / "c" / "legal_rag_index.sqlite"
    assert not (tmp_path / "c").exists()  # nothing is created by asking


def test_run_folder_saves_the_resolved_config_without_importing_the_cli(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from rizzearch.runs import RESOLVED_CONFIG, make_run_dir\n"
        "RESOLVED_CONFIG.set('steps: 3\\n')\n"
        f"make_run_dir({str(tmp_path / 'run')!r}, 'train')\n"
        "assert 'rizzearch.cli' not in sys.modules, 'runs.py imports the cli (upward)'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "run" / "config.yaml").read_text() == "steps: 3\n"


@pytest.mark.parametrize("args, key", [
    (["--model_config.d_model", "abc"], "model_config.d_model"),
    (["--model_config.tie_embeddings", "maybe"], "model_config.tie_embeddings"),
    (["--model", "xlstm", "--model_config.slstm_at", "one"], "model_config.slstm_at"),
    (["--model", "xlstm", "--model_config.n_layer", "2"], "model_config.n_layer"),  # gpt's key, not xlstm's
])
def test_model_config_is_typed_by_the_chosen_model(args, key, capsys):
    with pytest.raises(SystemExit) as e:
        parse_command("train", args)
    assert e.value.code == 2
    assert key in capsys.readouterr().err


SEEN: dict = {}


def fake_train(model: str = "gpt", model_config: dict | None = None, steps: int = 1) -> None:
    """A command with the same model / model_config parameters as ``rizz train``."""
    SEEN.clear()
    SEEN.update(model=model, model_config=model_config, steps=steps)


def test_model_config_overrides_reach_the_function_typed_and_partial(tmp_path, monkeypatch):
    from rizzearch.cli import run_command

    monkeypatch.setitem(COMMANDS, "fake", (f"{__name__}:fake_train", "test"))
    run_command("fake", ["--model", "xlstm", "--model_config.n_blocks", "2", "--model_config.slstm_at", "[0]"])
    assert SEEN["model_config"] == {"n_blocks": 2, "slstm_at": (0,)}  # only what was given: vocab_size stays the tokenizer's
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: rwkv\nmodel_config:\n  d_model: 96\n  tie_embeddings: true\n")
    run_command("fake", ["--config", str(cfg), "--model_config.n_layer", "3"])
    assert SEEN["model"] == "rwkv" and SEEN["model_config"] == {"d_model": 96, "tie_embeddings": True, "n_layer": 3}
    run_command("fake", ["--steps", "2"])
    assert SEEN["model_config"] is None and SEEN["steps"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: rwkv\nmodel_config:\n  n_head: 4\n")  # gpt's key under rwkv
    with pytest.raises(SystemExit):
        run_command("fake", ["--config", str(bad)])


def test_a_newly_registered_model_config_is_typed_without_cli_changes(monkeypatch, capsys):
    from dataclasses import dataclass

    from rizzearch.models import base

    @dataclass(frozen=True)
    class ToyConfig:
        """Toy.

        Args:
            vocab_size: number of token ids.
            width: hidden width.
            kinds: layer kinds.
        """

        vocab_size: int = 256
        width: int = 8
        kinds: tuple[str, ...] = ("a",)

    class Toy(base.CausalLM):
        pass

    monkeypatch.setitem(base._REGISTRY, "toy", (Toy, ToyConfig))
    monkeypatch.setitem(base._TINY, "toy", {})
    _, _, cfg = parse_command("train", ["--model", "toy", "--model_config.width", "16", "--model_config.kinds", "[a, b]"])
    assert cfg.model_config.width == 16 and list(cfg.model_config.kinds) == ["a", "b"]
    with pytest.raises(SystemExit):
        parse_command("train", ["--model", "toy", "--model_config.width", "wide"])
    assert "model_config.width" in capsys.readouterr().err


def test_saved_config_parses_back_to_the_same_overrides(trained_run):
    from rizzearch.models.base import overrides_to_dict

    _, _, cfg = parse_command("train", ["--config", str(trained_run / "config.yaml")])
    assert overrides_to_dict(cfg.model_config.as_dict()) == {"n_layer": 1, "d_model": 32, "n_head": 2}
    assert cfg.train.steps == 4
