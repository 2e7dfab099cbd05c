"""Every path a config or a command can name goes through the one path check (README "Files and secrets"):
stage data, `model.adapters`, `eval.baseline_model` and `tunesmith eval --data`, not only `data.*`.

Each refused path exists and would be read without the check (a valid data file, an adapter directory),
so a missing check shows up as a run that goes ahead, not as some other error."""

from __future__ import annotations

import shutil

import pytest
from _security import base_config, cli, refused, write_data
from conftest import instruction_rows, write_config, write_jsonl


@pytest.fixture
def env(tmp_path):
    """tmp/work is the cwd and the allowed root; tmp/home is HOME with a ~/.ssh holding valid data and a
    (fake) adapter; tmp/outside holds the same outside the allowed root."""
    work, home, outside = tmp_path / "work", tmp_path / "home", tmp_path / "outside"
    write_data(work)
    for base in (home / ".ssh", outside):
        write_jsonl(base / "data.jsonl", instruction_rows(48, seed=3))
        (base / "adapter").mkdir(parents=True)
        (base / "adapter" / "adapter_config.json").write_text("{}")
        (base / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    return {"work": work, "home": home, "outside": outside}


def _run(env: dict, cfg: dict, *args: str):
    write_config(env["work"], cfg)
    return cli(*(args or ("train", "config.yaml")), cwd=env["work"], env={"HOME": str(env["home"])})


def _classifier(cfg: dict) -> dict:
    cfg["data"] = {"train": "data/cls.jsonl", "format": "classification", "max_length": 32}
    return cfg


# How each case names the refused path `p`, and the field its refusal must name
CASES = {
    "stage-train": lambda cfg, p: cfg.update(stages=[{"name": "s1", "data": {"train": p["data"]}}]),
    "stage-validation": lambda cfg, p: cfg.update(
        stages=[{"name": "s1", "data": {"train": "data/train.jsonl", "validation": p["data"]}}]
    ),
    "stage-test": lambda cfg, p: cfg.update(
        stages=[{"name": "s1", "data": {"train": "data/train.jsonl", "test": p["data"]}}]
    ),
    "model-adapters": lambda cfg, p: cfg["model"].update(adapters=[p["adapter"]]),
    "eval-baseline_model": lambda cfg, p: _classifier(cfg)["eval"].update(baseline_model=p["adapter"]),
}
FIELDS = {
    "stage-train": "stages.0.data.train",
    "stage-validation": "stages.0.data.validation",
    "stage-test": "stages.0.data.test",
    "model-adapters": "model.adapters.0",
    "eval-baseline_model": "eval.baseline_model",
}


@pytest.mark.parametrize("where", ["credentials", "outside"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_config_path_is_checked(env, tiny_llama, case, where):
    cfg = base_config(tiny_llama, max_steps=1)
    write_jsonl(env["work"] / "data" / "cls.jsonl", [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(24)])
    if where == "credentials":
        paths = {"data": "~/.ssh/data.jsonl", "adapter": "~/.ssh/adapter"}
        needle = "points at a credentials location"
    else:
        paths = {"data": str(env["outside"] / "data.jsonl"), "adapter": str(env["outside"] / "adapter")}
        cfg["allowed_roots"] = [str(env["work"]), str(tiny_llama)]
        needle = "outside allowed_roots"
    CASES[case](cfg, paths)
    res = _run(env, cfg)
    refused(res, "Refused paths", f"{FIELDS[case]}: ", needle)
    assert not (env["work"] / "runs").exists()


def test_control_the_same_stage_config_inside_the_roots_trains(env, tiny_llama):
    """The stage config above is valid: with its data inside the allowed root it runs (so the refusals
    are the path check, not a malformed stage)."""
    shutil.copy(env["outside"] / "data.jsonl", env["work"] / "data" / "stage.jsonl")
    cfg = base_config(tiny_llama, max_steps=1)
    cfg.update(
        allowed_roots=[str(env["work"]), str(tiny_llama)],
        stages=[{"name": "s1", "data": {"train": "data/stage.jsonl"}, "train": {"max_steps": 1}}],
    )
    res = _run(env, cfg)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama):
    """One finished 1-step run whose config limits paths to its own directory and the model."""
    root = tmp_path_factory.mktemp("eval-data")
    write_data(root)
    cfg = base_config(tiny_llama, max_steps=1)
    cfg["allowed_roots"] = [str(root), str(tiny_llama)]
    write_config(root, cfg)
    res = cli("train", "config.yaml", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    return root


@pytest.mark.parametrize("where", ["credentials", "outside", "inside"])
def test_eval_data_is_checked(finished, tmp_path, where):
    home = tmp_path / "home"
    write_jsonl(home / ".ssh" / "data.jsonl", instruction_rows(12, seed=3))
    write_jsonl(tmp_path / "outside.jsonl", instruction_rows(12, seed=3))
    write_jsonl(finished / "data" / "more.jsonl", instruction_rows(12, seed=3))
    data = {
        "credentials": "~/.ssh/data.jsonl",
        "outside": str(tmp_path / "outside.jsonl"),
        "inside": "data/more.jsonl",
    }[where]
    res = cli("eval", "runs/tiny", "--data", data, cwd=finished, env={"HOME": str(home)})
    if where == "inside":  # the control: the same command on a file inside the root scores it
        assert res.returncode == 0, res.stderr[-3000:]
        return
    refused(res, f"--data: {data}", "credentials location" if where == "credentials" else "outside allowed_roots")
