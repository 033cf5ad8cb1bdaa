"""Every CLI answers bad input with one line `error: <input>: ...`, exit 2, no traceback.

Each tool is run once as a real subprocess (`python tools/X.py ...`, as a user would); the other
bad inputs of that tool go through one more subprocess that calls `run_cli(main, argv)` per case,
so the import of torch/megatron (most of a CLI's start-up time) is paid once per tool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_evaluation_support import save_tiny_teacher, write_char_tokenizer

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
ENV.pop("OPDLM_THIRD_PARTY_LOG", None)
ENV.pop("OPDLM_TRACEBACK", None)

# Runs several cases in one process: [[target, argv], ...] -> [[exit status, stderr], ...].
# target is "module:function" or "tools/file.py:function".
RUNNER = r"""
import contextlib, importlib.util, io, json, sys
from megatron_opdlm.cli_errors import route_third_party_output, run_cli
route_third_party_output()
out = []
for target, argv in json.loads(sys.argv[1]):
    where, _, name = target.partition(":")
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location("tool", where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        target = getattr(module, name)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_cli(target, argv)
        except SystemExit as exc:
            status = exc.code
    out.append([status, err.getvalue()])
print(json.dumps(out))
"""


def _assert_one_line_error(status, stderr: str, expected: str, case) -> None:
    assert status == 2, (case, status, stderr)
    assert "Traceback" not in stderr, (case, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, stderr)
    assert expected in lines[0], (case, lines[0])


def run_tool(tool: str, argv: list[str], expected: str, cwd: Path) -> None:
    """The real command line: `python tools/<tool> argv`."""
    done = subprocess.run([sys.executable, str(ROOT / "tools" / tool), *argv], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    _assert_one_line_error(done.returncode, done.stderr, expected, argv)


def run_cases(target: str, cases: list[tuple[list[str], str]], cwd: Path) -> None:
    """Several bad inputs of one tool in one subprocess; each must be one line, exit 2."""
    payload = json.dumps([[target, argv] for argv, _ in cases])
    done = subprocess.run([sys.executable, "-c", RUNNER, payload], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for (argv, expected), (status, stderr) in zip(cases, results, strict=True):
        _assert_one_line_error(status, stderr, expected, argv)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny AR checkpoint (with tokenizer), a tiny HF directory, and bad input files."""
    from megatron_opdlm.config import ParallelConfig
    from megatron_opdlm.conversion.synthetic import save_tiny_hf
    from megatron_opdlm.runtime import distributed

    root = tmp_path_factory.mktemp("cli")
    tokenizer = write_char_tokenizer(root / "tokenizer")
    distributed.initialize(ParallelConfig(), seed=0)
    try:
        save_tiny_teacher(root / "ckpt", tokenizer)
    finally:
        distributed.shutdown()
    save_tiny_hf("llama", root / "hf")
    (root / "empty").mkdir()
    (root / "not_ckpt").mkdir()
    (root / "not_ckpt" / "notes.txt").write_text("hello\n")
    (root / "bad_line.jsonl").write_text('{"prompt": "hi"}\n{"prompt": \n')
    (root / "no_prompt.jsonl").write_text('{"text": "hi"}\n')
    (root / "bad_turn.jsonl").write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    (root / "blank.txt").write_text("\n  \n")
    (root / "garbage.yaml").write_text("train: [unclosed\n")
    return root


def _broken_hf(work: Path, name: str, content: bytes | None) -> Path:
    """A copy of the tiny HF directory whose safetensors file is `content` (None: truncated)."""
    import shutil

    directory = work / name
    if not directory.exists():
        shutil.copytree(work / "hf", directory)
        weights = directory / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if content is None else content)
    return directory


def test_generate_bad_input(work):
    ckpt = str(work / "ckpt")
    run_tool("generate.py", ["--ckpt", str(work / "empty"), "--prompt", "hi"], "--ckpt", work)
    cases = [
        (["--ckpt", ckpt, "--prompts", str(work / "bad_line.jsonl")], "bad_line.jsonl:2"),
        (["--ckpt", ckpt, "--prompts", str(work / "no_prompt.jsonl")], "no_prompt.jsonl:1"),
        (["--ckpt", ckpt, "--prompts", str(work / "bad_turn.jsonl")], "bad_turn.jsonl:1"),
        (["--ckpt", ckpt, "--prompts", str(work / "blank.txt")], "holds no prompts"),
        (["--ckpt", ckpt, "--prompts", str(work / "missing.txt")], "does not exist"),
        (["--ckpt", ckpt, "--prompt", "  "], "--prompt: is empty"),
        (["--ckpt", str(work / "not_ckpt"), "--prompt", "hi"], "not a megatron-opdlm checkpoint"),
        (["--ckpt", str(work / "missing"), "--prompt", "hi"], "is not a directory"),
        (["--ckpt", ckpt, "--prompt", "hi", "--remasking", "sideways"], "remasking"),
        (["--ckpt", ckpt, "--prompt", "hi", "--max-new-tokens", "x"], "--max-new-tokens"),
        (["--ckpt", ckpt, "--prompt", "hi", "--tp", "2"], "world size"),
        (["--ckpt", ckpt, "--prompt", "hi", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (
            ["--ckpt", ckpt, "--prompt", "hi", "--chat", "--chat-template-kwargs", "thinking"],
            "--chat-template-kwargs 'thinking' is not a mapping",
        ),
        (["--ckpt", ckpt, "--prompt", "hi", "--chat-template-kwargs", "a=1"], "without --chat"),
    ]
    run_cases("tools/generate.py:main", cases, ROOT)


@pytest.mark.slow
def test_generate_reads_messages_records(work):
    """{"messages": [...]} records, which the training loader accepts, generate like "prompt"."""
    prompts = work / "chat.jsonl"
    prompts.write_text(
        '{"messages": [{"role": "system", "content": "Be brief."}, '
        '{"role": "user", "content": "Hi"}]}\n{"prompt": "Hello"}\n'
    )
    out = work / "generated.jsonl"
    argv = [sys.executable, str(ROOT / "tools" / "generate.py"), "--ckpt", str(work / "ckpt"),
            "--prompts", str(prompts), "--chat", "--max-new-tokens", "4",
            "--output", str(out)]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in results] == [0, 1]
    assert results[0]["prompt"][1] == {"role": "user", "content": "Hi"}
    assert all(1 <= len(r["tokens"]) <= 4 for r in results)


def test_converters_bad_input(work):
    truncated = _broken_hf(work, "hf_truncated", None)
    garbage = _broken_hf(work, "hf_garbage", b"this is not a safetensors file\n")
    tiny = _broken_hf(work, "hf_tiny", b"abc")
    bad_config = _broken_hf(work, "hf_bad_config", None)
    (bad_config / "config.json").write_text("{not json")
    out = str(work / "out_never_written")
    run_tool("convert_hf_to_megatron.py", ["--hf-dir", str(garbage), "--out", out],
             "model.safetensors: not a safetensors file", work)  # fmt: skip
    to_megatron = [
        (["--hf-dir", str(truncated), "--out", out], "truncated"),
        (["--hf-dir", str(tiny), "--out", out], "not a safetensors file"),
        (["--hf-dir", str(bad_config), "--out", out], "config.json: not valid JSON"),
        (["--hf-dir", str(work / "empty"), "--out", out], "no config.json"),
        (["--hf-dir", str(work / "hf"), "--out", str(work / "ckpt")], "exists"),
        (["--hf-dir", str(work / "hf"), "--out", out, "--tp", "x"], "--tp"),
    ]
    run_cases("megatron_opdlm.conversion.cli:hf_to_megatron_main", to_megatron, work)
    assert not Path(out).exists()
    run_tool("convert_megatron_to_hf.py", ["--ckpt", str(work / "empty"), "--out", out],
             "not a megatron-opdlm checkpoint", work)  # fmt: skip
    to_hf = [
        (["--ckpt", str(work / "not_ckpt"), "--out", out], "not a megatron-opdlm checkpoint"),
        (["--ckpt", str(work / "ckpt"), "--out", str(work / "hf")], "exists"),
        (["--ckpt", str(work / "ckpt")], "--out"),
    ]
    run_cases("megatron_opdlm.conversion.cli:megatron_to_hf_main", to_hf, work)


def test_train_bad_input(work):
    config = str(ROOT / "examples" / "configs" / "demo_smollm2.yaml")
    prompts = f"data.train_prompts={ROOT / 'megatron_opdlm/data/bundled/prompts_train.jsonl'}"
    run_tool("train.py", ["--config", config, prompts, "parallel.tp=2"],
             "parallel.tp=2 x parallel.pp=1: needs a multiple of 2 processes", work)  # fmt: skip
    cases = [
        (["--config", str(work / "missing.yaml")], "does not exist"),
        (["--config", str(work / "garbage.yaml")], "garbage.yaml"),
        (["--config", config, "nosuch.key=1"], "nosuch"),
        (["--config", config, "train.nosuchkey=1"], "nosuchkey"),
        (["--config", config, "train.rollout_steps=[1"], "not a YAML value"),
        (
            ["--config", config, prompts, "parallel.tp=2", "parallel.pp=2"],
            "multiple of 4 processes",
        ),
        (["--config", config, "--bogus-flag"], "--bogus-flag"),
        (["--config", config, "data.chat_template_kwargs=true"], "expected a mapping"),
    ]
    run_cases("megatron_opdlm.training.cli:main", cases, work)


def test_evaluate_bad_input(work):
    ckpt = str(work / "ckpt")
    run_tool("evaluate.py", ["--teacher", ckpt, "--qa-items", "many"], "--qa-items", work)
    cases = [
        (["--teacher", str(work / "missing")], "is not a directory"),
        (["--teacher", ckpt, "--model", "a"], "expected NAME=VALUE"),
        (["--model", f"a={ckpt}"], "--model needs --teacher"),
        (["--teacher", ckpt, "--max-new-tokens", "10"], "not a multiple of --block-size=4"),
        (["--teacher", ckpt, "--heldout", str(work / "bad_line.jsonl")], "bad_line.jsonl:2"),
        ([], "nothing to do"),
        (["--teacher", ckpt, "--chat-template-kwargs", "tokenize=true"], "'tokenize' is an arg"),
    ]
    run_cases("tools/evaluate.py:main", cases, ROOT)
