"""RELIABILITY.md S3 (remote code) and S4 (paths), on the tiny random Llama through the real CLI.
Each case has a control: the remote-code fixture runs when trusted, the audit hook sees a read."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from _cli import run_cli
from _security import _env, base_config, cli, refused, write_data
from conftest import instruction_rows, write_config, write_jsonl

from tunesmith.security import model_dir_problems

# --------------------------------------------------------------------------------------------------
# S3 Remote code
# --------------------------------------------------------------------------------------------------

REVISION = "0123456789abcdef0123456789abcdef01234567"


def remote_code_repo(tiny_llama: Path, dest: Path, sentinel: Path, model_type: str = "x-custom") -> Path:
    """A local model repo whose config names custom code that writes `sentinel` when imported."""
    shutil.copytree(tiny_llama, dest)
    (dest / "configuration_x.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(sentinel)!r}).write_text('executed')\n"
        "from transformers import LlamaConfig\n\n\n"
        "class XConfig(LlamaConfig):\n    model_type = 'x-custom'\n"
    )
    (dest / "modeling_x.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_x import XConfig\n\n\n"
        "class XForCausalLM(LlamaForCausalLM):\n    config_class = XConfig\n"
    )
    config = json.loads((dest / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    return dest


@pytest.fixture
def remote(tmp_path, tiny_llama):
    write_data(tmp_path)
    sentinel = tmp_path / "SENTINEL"
    repo = remote_code_repo(tiny_llama, tmp_path / "repo", sentinel)
    cfg = base_config(repo, max_steps=1)
    return tmp_path, cfg, sentinel


def test_s3_remote_code_is_refused_by_default(remote):
    root, cfg, sentinel = remote
    write_config(root, cfg)
    res = cli("train", "config.yaml", cwd=root, env={"HF_HOME": str(root / "hf")})
    refused(res, "custom code", "trust_remote_code")
    assert not sentinel.exists()
    assert not (root / "runs/tiny").exists()  # no half-made run left behind


@pytest.mark.parametrize("revision", [None, "main", REVISION.upper(), REVISION[:39]])
def test_s3_trust_remote_code_needs_a_40_hex_revision(remote, revision):
    root, cfg, sentinel = remote
    cfg["model"].update(trust_remote_code=True, revision=revision)
    write_config(root, cfg)
    res = cli("train", "config.yaml", cwd=root, env={"HF_HOME": str(root / "hf")})
    refused(res, "model: trust_remote_code needs `revision` pinned to a 40-hex commit")
    assert not sentinel.exists()
    assert not (root / "runs").exists()  # a config error: nothing is created


def test_s3_control_trusted_and_pinned_runs_the_code_and_records_both(remote):
    """The fixture is live: with the opt-in the repo's code is imported (sentinel appears), and the run's
    config snapshot records trust_remote_code and the pinned revision."""
    root, cfg, sentinel = remote
    cfg["model"].update(trust_remote_code=True, revision=REVISION)
    write_config(root, cfg)
    res = cli("train", "config.yaml", cwd=root, env={"HF_HOME": str(root / "hf")})
    assert res.returncode == 0, res.stderr[-3000:]
    assert sentinel.read_text() == "executed"
    snap = yaml.safe_load((root / "runs/tiny/config.yaml").read_text())
    assert snap["model"]["trust_remote_code"] is True and snap["model"]["revision"] == REVISION


@pytest.fixture(scope="module")
def known_type_remote_run(tmp_path_factory, tiny_llama):
    """auto_map next to a model_type transformers knows (llama): run once, shared by two tests."""
    root = tmp_path_factory.mktemp("known-type")
    write_data(root)
    sentinel = root / "SENTINEL"
    repo = remote_code_repo(tiny_llama, root / "repo", sentinel, model_type="llama")
    write_config(root, base_config(repo, max_steps=1))
    return cli("train", "config.yaml", cwd=root, env={"HF_HOME": str(root / "hf")}), sentinel


def test_s3_auto_map_with_a_known_model_type_never_runs_the_code(known_type_remote_run):
    res, sentinel = known_type_remote_run
    assert "Traceback" not in res.stderr
    assert not sentinel.exists()


def test_s3_auto_map_with_a_known_model_type_is_refused(known_type_remote_run):
    res, _ = known_type_remote_run
    refused(res, "auto_map")


def test_s3_a_dataset_loading_script_is_never_run(tmp_path, tiny_llama):
    write_data(tmp_path)
    sentinel = tmp_path / "SENTINEL"
    script = f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('executed')\n"
    (tmp_path / "scripted").mkdir()
    (tmp_path / "scripted" / "scripted.py").write_text(script)
    write_jsonl(tmp_path / "scripted" / "train.jsonl", instruction_rows(8))
    cfg = base_config(tiny_llama, max_steps=1)
    for source, needle in (("scripted", "not a saved HF dataset"), ("scripted/scripted.py", "unknown file type")):
        cfg["data"]["train"] = source
        write_config(tmp_path, cfg)
        refused(cli("train", "config.yaml", "--overwrite", cwd=tmp_path), needle)
        assert not sentinel.exists()


# --------------------------------------------------------------------------------------------------
# S4 Paths
# --------------------------------------------------------------------------------------------------

AUDITED_CLI = r"""
import json, os, sys
watched = set(json.loads(os.environ["TS_WATCH"]))
opened = []
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        try:
            real = os.path.realpath(os.fsdecode(args[0]))
        except Exception:
            return
        if real in watched:
            opened.append(real)
sys.addaudithook(hook)
import atexit
atexit.register(lambda: sys.stderr.write("\nAUDIT-OPENED " + json.dumps(opened) + "\n"))
from tunesmith.cli import main
sys.argv = ["tunesmith", *sys.argv[1:]]
main()
"""


def audited_cli(args: list, cwd: Path, watch: list[Path], home: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the CLI with an audit hook recording every open() of a watched file (symlinks resolved)."""
    env = _env({"TS_WATCH": json.dumps([os.path.realpath(p) for p in watch]), "HOME": str(home)})
    res = run_cli(*args, program=("-c", AUDITED_CLI), cwd=cwd, env=env, timeout=600)
    found = re.findall(r"AUDIT-OPENED (.*)", res.stderr)
    assert found, res.stderr[-3000:]  # the hook ran to the end
    return res, json.loads(found[-1])


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            kind = stat.S_IFMT(st.st_mode)
            # a directory's own mtime moves when an entry is added below it; the entry itself is what counts
            out[str(p.relative_to(root))] = (kind, 0, 0) if kind == stat.S_IFDIR else (kind, st.st_size, st.st_mtime_ns)
    return out


def changed_outside(before: dict, after: dict, allowed: list[str]) -> list[str]:
    changed = {k for k in after if before.get(k) != after[k]} | {k for k in before if k not in after}
    return sorted(k for k in changed if not any(k == a or k.startswith(a + os.sep) for a in allowed))


@pytest.fixture
def paths_env(tmp_path, tiny_llama):
    """tmp/a/b is the cwd (two levels deep); data lives there; a fake HOME, a decoy tmp/etc/passwd, a file
    outside the allowed root reached by a symlink, and a model dir whose tokenizer names ../.env."""
    cwd = tmp_path / "a" / "b"
    write_data(cwd)
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "todo.txt").write_text("nothing\n")
    decoy = tmp_path / "etc" / "passwd"
    decoy.parent.mkdir()
    decoy.write_text("root:x:0:0:decoy\n")
    outside = write_jsonl(tmp_path / "outside" / "secret.jsonl", instruction_rows(48, seed=7))
    (cwd / "data" / "link.jsonl").symlink_to(outside)
    model = tmp_path / "models" / "m"
    shutil.copytree(tiny_llama, model)
    (tmp_path / "models" / ".env").write_text("HF_TOKEN=hf_shouldneverbereadxxxxxxxxxxxx\n")
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg["vocab_file"] = "../.env"
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return {
        "root": tmp_path,
        "cwd": cwd,
        "home": home,
        "tiny": tiny_llama,
        "model": model,
        "watch": [Path("/etc/passwd"), decoy, outside, tmp_path / "models" / ".env"],
        "roots": [str(cwd), str(tiny_llama)],
    }


def _case(env: dict, case: str) -> tuple[dict, list[str]]:
    cfg = base_config(env["tiny"], max_steps=1)
    if case == "dotdot-to-/etc/passwd":
        cfg["data"]["train"] = os.path.relpath("/etc/passwd", env["cwd"])
        return cfg, ["data.train", "system directory"]
    if case == "../../etc/passwd-outside-roots":
        cfg["data"]["train"] = "../../etc/passwd"  # the decoy tmp/etc/passwd: real, readable, outside the root
        cfg["allowed_roots"] = env["roots"]
        return cfg, ["data.train: ../../etc/passwd", "outside allowed_roots"]
    if case == "absolute-/etc/passwd":
        cfg["data"]["train"] = "/etc/passwd"
        return cfg, ["data.train: /etc/passwd", "system directory"]
    if case == "symlink-escaping-root":
        cfg["data"]["train"] = "data/link.jsonl"
        cfg["allowed_roots"] = env["roots"]
        return cfg, ["data.train: data/link.jsonl", "outside allowed_roots"]
    if case == "output_dir-home":
        cfg["output_dir"] = "~"
        return cfg, ["output_dir: ~", "use a dedicated directory"]
    if case == "tokenizer-vocab_file-../.env":
        cfg["model"]["name"] = str(env["model"])
        return cfg, ["vocab_file points outside the model directory (../.env)"]
    raise AssertionError(case)


CASES = [
    "dotdot-to-/etc/passwd",
    "../../etc/passwd-outside-roots",
    "absolute-/etc/passwd",
    "symlink-escaping-root",
    "output_dir-home",
    "tokenizer-vocab_file-../.env",
]


@pytest.mark.parametrize("case", CASES)
def test_s4_path_is_refused_before_any_read_and_nothing_is_written_outside_output_dir(paths_env, case):
    cfg, needles = _case(paths_env, case)
    cwd, root = paths_env["cwd"], paths_env["root"]
    write_config(cwd, cfg)
    before = snapshot(root)
    res, opened = audited_cli(["train", "config.yaml"], cwd, paths_env["watch"], paths_env["home"])
    refused(res, *needles)
    assert opened == []
    output_dir = str(Path(os.path.relpath(cwd, root)) / "runs") if cfg["output_dir"] == "runs" else None
    assert changed_outside(before, snapshot(root), [output_dir] if output_dir else []) == []
    assert not (paths_env["home"] / "tiny").exists()


def test_s4_one_config_with_every_bad_path_lists_each(paths_env):
    cfg = base_config(paths_env["tiny"], max_steps=1)
    cfg["data"].update(train="/etc/passwd", validation="../../etc/passwd", test="data/link.jsonl")
    cfg["output_dir"] = "~"
    cfg["allowed_roots"] = paths_env["roots"]
    write_config(paths_env["cwd"], cfg)
    before = snapshot(paths_env["root"])
    res, opened = audited_cli(["train", "config.yaml"], paths_env["cwd"], paths_env["watch"], paths_env["home"])
    refused(
        res,
        "Refused paths",
        "output_dir: ~",
        "data.train: /etc/passwd",
        "data.validation: ../../etc/passwd",
        "data.test: data/link.jsonl",
    )
    assert len(re.findall(r"^\s+- ", res.stderr, re.M)) == 4, res.stderr
    assert opened == []
    assert changed_outside(before, snapshot(paths_env["root"]), []) == []


def test_s4_control_the_audit_hook_sees_a_read_through_the_symlink(paths_env):
    """Without allowed_roots the same symlink is legitimate: `data check` reads through it and the hook
    records the target. An empty `opened` list above therefore means no read, not a blind hook."""
    cfg = base_config(paths_env["tiny"], max_steps=1)
    cfg["data"]["train"] = "data/link.jsonl"
    write_config(paths_env["cwd"], cfg)
    res, opened = audited_cli(["data", "check", "config.yaml"], paths_env["cwd"], paths_env["watch"], paths_env["home"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.realpath(paths_env["watch"][2]) in opened


def test_s4_control_the_snapshot_sees_a_write(tmp_path):
    (tmp_path / "runs").mkdir()
    before = snapshot(tmp_path)
    (tmp_path / "runs" / "ok.txt").write_text("inside")
    assert changed_outside(before, snapshot(tmp_path), ["runs"]) == []
    (tmp_path / "stray.txt").write_text("outside")
    (tmp_path / "runs-not").mkdir()
    assert changed_outside(before, snapshot(tmp_path), ["runs"]) == ["runs-not", "stray.txt"]
    before = snapshot(tmp_path)
    (tmp_path / "stray.txt").write_text("changed!")
    assert changed_outside(before, snapshot(tmp_path), ["runs"]) == ["stray.txt"]


def test_s4_control_tokenizer_check_accepts_the_clean_model_and_flags_dot_env(tmp_path, tiny_llama):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model)
    assert model_dir_problems(str(model)) == []
    cfg_path = model / "tokenizer_config.json"
    clean = json.loads(cfg_path.read_text())
    for value in ("../.env", ".env", "../../../etc/passwd"):
        cfg_path.write_text(json.dumps({**clean, "vocab_file": value}))
        assert model_dir_problems(str(model)), value
