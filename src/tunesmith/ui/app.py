"""`tunesmith ui`: the runs folder in a browser, built on the run directory contract.

The server reads run directories and starts `tunesmith train` processes; it never imports training code,
so a page never waits on a model and a crash in a run never takes the UI down. Pages are Jinja2 templates
(autoescaped: sample text shows as text), charts are uPlot, vendored in static/ (the UI works offline),
and a running run's page follows metrics.jsonl through server-sent events.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from tunesmith.errors import UserError
from tunesmith.report.numbers import fmt
from tunesmith.rundir import RunDir
from tunesmith.ui import launch, preview, runs, studies, try_it
from tunesmith.ui.guard import Access, Guard, run_path

HERE = Path(__file__).parent
POLL_S = 1.0  # how often a live page's stream looks for new metrics lines


def create_app(runs_root: Path, access: Access, examples: Path = Path("examples")) -> FastAPI:
    """`examples`: the folder of example configs the new-run form offers (default: ./examples, a checkout's)."""
    root = Path(runs_root)
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, access=access)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    pages = Jinja2Templates(directory=HERE / "templates")
    pages.env.filters["fmt"] = fmt
    pages.env.globals.update(csrf=access.csrf, age=runs.age)

    def open_run(name: str) -> RunDir:
        path = run_path(root, name)
        if path is None or not (path / "config.yaml").is_file():
            raise HTTPException(404, f"no run named {name!r} in {root}")
        return RunDir(path)

    add_actions(app, root, open_run)
    add_run_pages(app, root, pages, open_run)
    add_study_pages(app, root, pages)

    @app.get("/", response_class=HTMLResponse)
    def runs_page(request: Request, task: str = "", status: str = ""):
        rows = runs.list_runs(root)
        shown = [r for r in rows if (not task or r["task"] == task) and (not status or r["status"] == status)]
        choices = {"tasks": sorted({r["task"] for r in rows}), "statuses": sorted({r["status"] for r in rows})}
        context = {"rows": shown, "root": root, "task": task, "status": status, "studies": studies.list_studies(root)}
        return pages.TemplateResponse(request, "runs.html", {**context, **choices})

    @app.get("/favicon.ico")
    def favicon():  # pages without the base template (compare, report.html) still make browsers ask
        return Response(status_code=204)

    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(run: Annotated[list[str], Query()] = []):  # noqa: B006 (FastAPI copies defaults)
        from tunesmith.report.compare import compare_html

        chosen = [open_run(n).path for n in run]
        if len(chosen) < 2:
            raise HTTPException(400, "pick at least two runs (?run=a&run=b)")
        return HTMLResponse(compare_html(chosen))

    @app.get("/new", response_class=HTMLResponse)
    def new_page(request: Request, source: str = "", example: str = ""):
        offered = sorted(p.name for p in examples.glob("*.yaml")) if examples.is_dir() else []
        text = ""
        if source:
            text = (open_run(source).path / "config.yaml").read_text(errors="replace")
        elif example:
            if example not in offered:  # only a listed name: never a path
                raise HTTPException(404, f"no example config named {example!r} in {examples}")
            text = (examples / example).read_text(errors="replace")
        context = {"text": text, "root": root, "examples": offered, "example": example}
        return pages.TemplateResponse(request, "new.html", context)

    return app


def add_run_pages(app: FastAPI, root: Path, pages: Jinja2Templates, open_run) -> None:
    """One run: its page, the live stream that keeps the page's curves current, its report.html."""

    @app.get("/runs/{name}", response_class=HTMLResponse)
    def run_page(request: Request, name: str):
        run = open_run(name)
        recs, _ = runs.records(run)
        report, data = runs.read_json(run, "eval.json"), runs.read_json(run, "data_report.json")
        context = {
            "run": runs.summary(run),
            "progress": runs.progress(run, recs),
            "warnings": runs.warnings(recs),
            "verdict": runs.verdict(report),
            "samples": report.get("samples", []),
            "data": runs.data_sections(data),
            "histogram": runs.histogram(data),
            "curves": runs.curves(recs),
            "config": (run / "config.yaml").read_text(errors="replace"),
            "has_report": (run / "report.html").is_file(),
            "try_mode": try_it.mode(run),
            "log": launch.log_tail(root, name),
        }
        return pages.TemplateResponse(request, "run.html", context)

    @app.get("/runs/{name}/events")
    async def run_events(name: str):
        run = open_run(name)

        async def stream():
            seen: list[dict] = []
            offset = 0
            while True:
                new, offset = runs.records(run, offset)  # only what was appended since the last look
                if new:
                    seen += new
                    payload = {"curves": runs.curves(seen), "progress": runs.progress(run, seen)}
                    yield f"data: {json.dumps(payload)}\n\n"
                status = run.status()
                if status != "running":
                    yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                    return
                await asyncio.sleep(POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/runs/{name}/report", response_class=HTMLResponse)
    def run_report(name: str):
        run = open_run(name)
        if not (run / "report.html").is_file():
            raise HTTPException(404, "this run has no report.html yet")
        return HTMLResponse((run / "report.html").read_text(errors="replace"))


def add_study_pages(app: FastAPI, root: Path, pages: Jinja2Templates) -> None:
    """A search's trials table and plots, a learning curve's table and plot (what the commands wrote)."""

    def open_study(name: str, kind: str) -> Path:
        path = run_path(root, name)
        if path is None or studies.kind(path) != kind:
            raise HTTPException(404, f"no {kind} named {name!r} in {root}")
        return path

    def routes(kind: str) -> None:  # explicit prefixes: no pattern that could shadow another page
        @app.get(f"/{kind}/{{name}}", response_class=HTMLResponse)
        def page(request: Request, name: str):
            folder = open_study(name, kind)
            found = studies.search(folder) if kind == "search" else studies.curve(folder)
            return pages.TemplateResponse(request, "study.html", {"name": name, "kind": kind, **found})

        @app.get(f"/{kind}/{{name}}/{{file}}")
        def file_of(name: str, file: str):
            folder = open_study(name, kind)
            if file not in studies.FILES[kind] or not (folder / file).is_file():
                raise HTTPException(404, f"{name} has no {file}")
            return FileResponse(folder / file)

    routes("search")
    routes("curve")


def add_actions(app: FastAPI, root: Path, open_run) -> None:
    """What changes state or starts a process (POST, so the guard's CSRF check covers it): stop, resume,
    try, validate, preview, launch."""

    @app.post("/runs/{name}/stop")
    def run_stop(name: str):
        pid = act(lambda: launch.stop(open_run(name)))
        return {"stopped": pid}

    @app.post("/runs/{name}/resume")
    def run_resume(name: str):
        act(lambda: launch.resume(open_run(name), root))
        return {"resumed": name}

    @app.post("/runs/{name}/try")
    async def run_try(name: str, request: Request):
        run, asked = open_run(name), await request.json()
        if not isinstance(asked, dict):
            raise HTTPException(400, 'send {"text": ..., "model": "base" or "finetuned"}')
        text, which = str(asked.get("text", "")), str(asked.get("model", "finetuned"))
        problem = try_it.problem(run, text, which)
        if problem:
            raise HTTPException(400, problem)
        return StreamingResponse(try_it.answer(run, text, which), media_type="text/plain; charset=utf-8")

    @app.post("/api/validate")
    async def validate(request: Request):
        text = (await request.json()).get("yaml", "")
        _, problems = launch.validate(str(text), root)
        return {"ok": not problems, "problems": problems}

    @app.post("/api/preview")
    async def data_preview(request: Request):
        tree, problems = launch.validate(str((await request.json()).get("yaml", "")), root)
        if problems:
            return JSONResponse({"ok": False, "problems": problems}, status_code=422)
        return await preview.preview(tree, root)

    @app.post("/api/launch")
    async def launch_run(request: Request):
        tree, problems = launch.validate(str((await request.json()).get("yaml", "")), root)
        if problems:
            return JSONResponse({"ok": False, "problems": problems}, status_code=422)
        name = await run_in_threadpool(act, lambda: launch.launch(tree, root))  # waits for the run to start
        return {"ok": True, "run": name}

    @app.get("/api/keys")
    def config_keys():
        from tunesmith.config.keys import keys
        from tunesmith.config.schema import Config

        return [{"key": k.path, "kind": k.kind, "default": k.default, "help": k.description} for k in keys(Config)]


def act(what):
    try:
        return what()
    except UserError as err:
        raise HTTPException(409, err.title) from None
