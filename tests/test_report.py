"""``ckptstore report``: the figures are right (checked against torch on decoded tensors), the
heat map decodes only changed chunks in bounded memory, the page is self-contained, and it
renders in a real headless Chromium without console errors."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckptstore
from ckptstore.cli.main import cli
from ckptstore.report import data as report_data
from ckptstore.report.data import collect
from ckptstore.report.page import TITLES
from ckptstore.store import BlobReader, Repository, Store
from ckptstore.testing.s3server import ACCESS_KEY, SECRET_KEY
from tests.helpers import run_cli

STEPS = (10, 20, 30, 40)
FIGURES = ("bytes", "shares", "quant", "changes")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def _states():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=g)  # 128 KiB: 2 chunks of 64 KiB
    frozen = torch.randn(64, 512, generator=g)
    part = torch.randn(256, 256, generator=g)  # 4 chunks; only the first changes
    q = torch.randn(128, 256, generator=g)
    h = torch.randn(128, 256, generator=g)
    for i in range(len(STEPS)):
        p = part.clone()
        p[0] += i
        yield {
            "w": w * 1.1**i,
            "frozen": frozen,
            "part": p,
            "q": q + 0.01 * i,  # int8
            "h": h * (1 + 0.01 * i),  # fp16
            "grow": torch.ones(4 if i < 2 else 8),  # shape changes at step 30
            "n": torch.arange(100) * (i + 1),
            "b": torch.full((8,), float(i)),  # zeros at step 10
        }


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("report") / "store")
    for i, (step, state) in enumerate(zip(STEPS, _states(), strict=True)):
        ckptstore.save(
            state,
            url,
            step=step,
            chunk_bytes=1 << 16,
            quantize={"q": "int8", "h": "fp16"},
            delta=i == len(STEPS) - 1,
        )
    return url


@pytest.fixture(scope="module")
def page(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("page") / "report.html"
    result = CliRunner().invoke(cli, ["report", store, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖b−a‖/‖a‖ in double precision (0 where both are 0)."""
    wide = torch.complex128 if a.is_complex() else torch.float64
    a, b = a.to(wide), b.to(wide)
    ref = torch.linalg.vector_norm(a).item()
    diff = torch.linalg.vector_norm(b - a).item()
    return diff / ref if ref else 0.0 if diff == 0 else float("inf")


def _row(changes, fqn: str) -> tuple[list, list]:
    i = changes.tensors.index(fqn)
    return changes.values[i], changes.notes[i]


# -- figures ----------------------------------------------------------------------------------
def test_change_heat_map_matches_torch(store):
    data = collect(store)
    c = data.changes
    assert c.checkpoints == [f"step-{s:012d}" for s in STEPS] and c.steps == list(STEPS)
    assert set(c.tensors) == {"w", "frozen", "part", "q", "h", "grow", "n", "b"}
    values, _ = _row(c, "w")  # scaled by 1.1 each time (the last save a delta)
    assert values == pytest.approx([0.1] * 3, abs=1e-6)
    assert _row(c, "frozen") == ([0.0] * 3, ["identical chunks"] * 3)
    assert _row(c, "grow")[0] == [0.0, None, 0.0]
    assert _row(c, "grow")[1][1] == "shape changed ([4] → [8])"
    assert _row(c, "b")[0][0] is None and "only zeros" in _row(c, "b")[1][0]
    assert _row(c, "b")[0][1:] == pytest.approx([1.0, 0.5])
    loaded = [ckptstore.load_full(store, step=s) for s in STEPS]  # lossy ones dequantized
    for fqn in ("part", "q", "h", "n"):
        expect = [_rel(a[fqn], b[fqn]) for a, b in zip(loaded, loaded[1:], strict=False)]
        assert _row(c, fqn)[0] == pytest.approx(expect, rel=1e-9), fqn
    assert data.notes == []


def test_every_dtype_of_the_golden_store(tmp_path):
    """bf16, fp16, int64, bool, uint8, complex64, 0-d and empty tensors, against torch."""
    from tests.fixtures.v1_data import state
    from tests.test_golden_v1 import FIXTURE

    url = str(tmp_path / "v1")
    shutil.copytree(FIXTURE, url)
    c = collect(url, max_tensors=100).changes
    a, b = state(10), state(20)
    flat = {f"model.{k}": (a["model"][k], b["model"][k]) for k in a["model"]}
    flat["optim.state.0.step"] = (a["optim"]["state"][0]["step"], b["optim"]["state"][0]["step"])
    assert set(c.tensors) == set(flat)
    for fqn, (x, y) in flat.items():
        assert _row(c, fqn)[0] == [pytest.approx(_rel(x, y), rel=1e-12)], fqn


def test_quantization_error_is_the_recorded_one(store):
    data = collect(store)
    q = data.quant
    assert q.checkpoint == "step-000000000040" and q.lossy_checkpoints == 4
    recorded = {t.fqn: t for t in Store(store).inspect(step=40).tensors}
    assert {r.fqn: r.codec for r in q.rows} == {"q": "int8/64", "h": "fp16"}
    for r in q.rows:
        assert r.rel_l2 == recorded[r.fqn].rel_l2_error and 0 < r.rel_l2 < 0.02
        assert r.max_abs == recorded[r.fqn].max_abs_error
    assert q.worst is not None and q.worst[1] == "q"


def test_unchanged_chunks_are_not_decoded(store, monkeypatch):
    """Identical chunks count as 0 by key; each unchanged chunk of a partly changed tensor
    is decoded once (for ‖a‖), then its figure is reused."""
    reads: list[str] = []
    real = BlobReader.read_rows

    def counting(self, blob, row_start, row_stop, where, pool=None):
        reads.append(where.split(" ")[0])
        return real(self, blob, row_start, row_stop, where, pool)

    monkeypatch.setattr(BlobReader, "read_rows", counting)
    c = collect(store, threads=1).changes
    assert "'frozen'" not in reads
    # part: pair 1 reads its changed chunk twice and its 3 unchanged ones once; pairs 2, 3
    # read only the changed chunk (twice each)
    assert reads.count("'part'") == 2 + 3 + 2 + 2
    frozen = 64 * 512 * 4
    assert c.skipped_bytes >= 3 * frozen + 3 * 3 * (256 * 256 * 4 // 4)


def test_heat_map_memory_is_a_few_chunks(tmp_path):
    """Two 16 MiB checkpoints of one tensor, 512 KiB chunks: the peak stays far below the
    two whole-tensor copies (32 MiB) a naive comparison holds."""
    url = str(tmp_path / "big")
    w = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(1))
    ckptstore.save({"w": w}, url, step=1, chunk_bytes=1 << 19)
    ckptstore.save({"w": w * 1.1}, url, step=2, chunk_bytes=1 << 19)
    del w
    tracemalloc.start()
    try:
        c = collect(url, threads=1).changes
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert c.values == [[pytest.approx(0.1, abs=1e-6)]]
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_whole_tensor_path_when_shard_boxes_differ(store, monkeypatch):
    """Shard layouts that differ between checkpoints (a resharded save) fall back to whole
    tensors; the figures are the same."""
    by_chunks = collect(store).changes
    # every tensor's boxes told apart from every other's: no box matches, whole tensors
    boxes = lambda t: {(id(t), i): s.blob for i, s in enumerate(t.shards)}  # noqa: E731
    monkeypatch.setattr(report_data, "_boxes", boxes)
    whole = collect(store).changes
    assert whole.skipped_bytes == 0
    for fqn in ("w", "frozen", "part", "q", "h", "n"):
        assert _row(whole, fqn)[0] == pytest.approx(_row(by_chunks, fqn)[0], rel=1e-12)


def test_limits(store):
    data = collect(store, max_checkpoints=2, max_tensors=1)
    assert data.window == ["step-000000000030", "step-000000000040"]
    assert len(data.checkpoints) == 4  # sizes: every checkpoint
    assert data.changes.tensors == ["part"] and data.changes.omitted == 7
    assert data.quant.rows and len(data.quant.rows) == 1 and data.quant.omitted == 1
    assert any("--max-checkpoints" in n for n in data.notes)
    assert any("--max-tensors" in n for n in data.notes)
    assert collect(store, changes=False).changes is None


# -- the page and the command -----------------------------------------------------------------
def assert_self_contained(html: str) -> None:
    """No script, stylesheet or import fetched from elsewhere; plotly.js inlined once."""
    assert not re.search(r"<script[^>]*\bsrc\s*=", html)
    assert not re.search(r"<link\b", html) and "@import" not in html
    assert len(re.findall(r"\* plotly\.js v\d", html)) == 1  # inlined once


def figure_traces(html: str, key: str) -> list[dict]:
    """The traces of figure ``fig-<key>`` as the page hands them to ``Plotly.newPlot``."""
    call = re.search(r'Plotly\.newPlot\(\s*"fig-' + key + r'",\s*', html)
    assert call is not None, f"no figure fig-{key}"
    traces, _ = json.JSONDecoder().raw_decode(html, call.end())
    return traces


def test_page_is_self_contained(page):
    html = page.read_text(encoding="utf-8")
    assert_self_contained(html)
    for key in FIGURES:
        assert f'id="fig-{key}"' in html and TITLES[key] in html
    assert 3 * 2**20 < page.stat().st_size < 8 * 2**20


def test_cli_options_and_json(store, tmp_path):
    out = tmp_path / "r.html"
    args = ["report", store, "--output", str(out), "--no-changes", "--max-checkpoints", "3"]
    args.append("--json")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["checkpoints"] == 4 and len(summary["window"]) == 3
    assert summary["tensors_compared"] == 0 and summary["lossy_tensors"] == 2
    html = out.read_text(encoding="utf-8")
    assert 'id="fig-changes"' not in html and "--no-changes" in html


def test_cli_errors(store, tmp_path, monkeypatch):
    runner = CliRunner()
    out = str(tmp_path / "r.html")
    missing = runner.invoke(cli, ["report", str(tmp_path / "nothing"), "--output", out])
    assert missing.exit_code == 3 and "StoreNotFoundError" in missing.output
    habit = runner.invoke(cli, ["report", store, "-o", out])  # -o is a storage option
    assert habit.exit_code == 2 and "--output PATH" in habit.output
    assert not os.path.exists(out)
    monkeypatch.setitem(sys.modules, "plotly", None)  # as if the extra were not installed
    no_plotly = runner.invoke(cli, ["report", store, "--output", out])
    assert no_plotly.exit_code == 2
    assert "pip install 'ckptstore[report]'" in no_plotly.output
    assert not os.path.exists(out)


def test_names_from_the_store_stay_text_on_the_page(tmp_path):
    """Tensor and checkpoint names are the store's, and plotly reads labels as a subset of
    HTML: a name with tags must show as text, never become a link or markup."""
    from ckptstore.report import write_report

    url = str(tmp_path / "store")
    evil = '<a href="https://example.invalid/">click</a>'
    for step in (1, 2):
        t = torch.arange(4096, dtype=torch.float32) * step
        ckptstore.save({evil: t, "q": t.clone()}, url, step=step, quantize={"q": "int8"})
    out = tmp_path / "r.html"
    write_report(url, out)
    page = out.read_text(encoding="utf-8")
    # plotly's JSON writes "<" as \\u003c and "/" as \\u002f; the label must hold "&lt;"
    assert "\\u002f\\u002fexample.invalid" in page  # the name is there ...
    assert "\\u003ca href" not in page  # ... never as markup
    assert "&lt;a href" in page


def test_empty_store_gives_a_page_that_says_so(tmp_path):
    url = str(tmp_path / "empty")
    Repository.open(url, create=True)
    out = tmp_path / "r.html"
    result = CliRunner().invoke(cli, ["report", url, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "holds no committed checkpoint" in out.read_text(encoding="utf-8")


def test_cli_does_not_import_torch(store, tmp_path):
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from ckptstore.cli.main import cli\n"
        f"out = {str(tmp_path / 'r.html')!r}\n"
        f"r = CliRunner().invoke(cli, ['report', {store!r}, '--output', out])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# -- a store on S3 (a real SeaweedFS) --------------------------------------------------------
def test_report_of_an_s3_store(s3_url, s3_server, s3_options, tmp_path):
    g = torch.Generator().manual_seed(3)
    w, frozen = torch.randn(128, 256, generator=g), torch.randn(64, 64, generator=g)
    for i, step in enumerate((1, 2, 3)):  # w scaled by 1.1 at each step, frozen unchanged
        state = {"w": w * 1.1**i, "frozen": frozen}
        ckptstore.save(state, s3_url, step=step, storage_options=s3_options)
    out = tmp_path / "s3-report.html"
    creds = ["-o", f"key={ACCESS_KEY}", "--storage-option", f"secret={SECRET_KEY}"]
    endpoint = ["--endpoint-url", s3_server.endpoint_url]
    done = run_cli("report", s3_url, "--output", str(out), *endpoint, *creds, check=False)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and ": 3 checkpoint(s), 2 tensor(s)" in done.stdout

    html = out.read_text(encoding="utf-8")
    assert_self_contained(html)
    assert s3_url in html and SECRET_KEY not in html  # the store named, its secret not
    assert figure_traces(html, "bytes")[0]["x"] == [1, 2, 3]
    heat = figure_traces(html, "changes")[1]  # [0] paints the exact zeros grey
    assert heat["x"] == ["step 2", "step 3"]
    change = dict(zip(heat["y"], heat["customdata"], strict=True))
    assert change["w"] == pytest.approx([0.1, 0.1], abs=1e-6)
    assert change["frozen"] == [0.0, 0.0]

    # a wrong secret, a missing bucket: one line naming the bucket, exit 5, no page
    bad = run_cli(
        "report", s3_url, "--output", str(tmp_path / "bad.html"), *endpoint,
        "--storage-option", f"key={ACCESS_KEY}", "--storage-option", "secret=not-the-secret",
        check=False,
    )  # fmt: skip
    assert bad.returncode == 5, bad.stderr
    assert "AccessDeniedError" in bad.stderr and "'ckpt'" in bad.stderr
    missing = run_cli(
        "report", "s3://no-such-bucket/run", "--output", str(tmp_path / "missing.html"),
        check=False, env=s3_server.env(),  # credentials and endpoint from the environment
    )  # fmt: skip
    assert missing.returncode == 5, missing.stderr
    assert "BucketNotFoundError" in missing.stderr and "'no-such-bucket'" in missing.stderr
    for proc in (bad, missing):
        assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s3-report.html"]


def test_help_names_the_storage_option_flag_of_report():
    text = " ".join(CliRunner().invoke(cli, ["report", "-h"]).output.split())
    assert "the same as -o endpoint_url=URL" in text  # -o: a storage option, as everywhere
    assert "-o, --storage-option KEY=VALUE" in text and "--output PATH" in text


def test_store_reads_a_checkpoint_down_to_its_chunks(store):
    """The public surface the report reads through: Store.manifest, read_rows, lossy_codec
    and the manifest records, all top-level names."""
    s = ckptstore.Store(store)
    m = s.manifest(step=40)
    assert isinstance(m, ckptstore.Manifest) and m.step == 40
    part = m.tensors["part"]
    assert isinstance(part, ckptstore.TensorEntry) and part.shape == [256, 256]
    (shard,) = part.shards
    assert isinstance(shard, ckptstore.Shard) and isinstance(shard.blob, ckptstore.Blob)
    assert all(isinstance(c, ckptstore.ChunkRef) for c in shard.blob.chunks)
    saved = list(_states())[-1]["part"]
    raw = s.read_rows(shard.blob, 1, 70, where="'part'")  # across a chunk boundary (64 rows)
    assert str(raw.dtype) == "uint8" and raw.tobytes() == saved[1:70].numpy().tobytes()
    assert s.lossy_codec(m.tensors["q"].shards[0].blob) == "int8/64"
    assert s.lossy_codec(m.tensors["h"].shards[0].blob) == "fp16"
    assert s.lossy_codec(shard.blob) is None
    assert s.settings.threads >= 1


# -- a real browser ---------------------------------------------------------------------------
@pytest.fixture
def chromium(tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI") == "true":
            pytest.fail("CI must install chromium and chromium-driver for the report test")
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver (Debian packages)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


_RENDERED = """return Array.from(document.querySelectorAll('.js-plotly-plot'))
    .filter(d => d.querySelector('.main-svg')).length"""

_COLOURS = """const done = arguments[arguments.length - 1];
const img = new Image();
img.onload = () => {
  const c = document.createElement('canvas');
  c.width = img.width; c.height = img.height;
  const ctx = c.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const px = ctx.getImageData(0, 0, c.width, c.height).data;
  const seen = new Set();
  for (let i = 0; i < px.length; i += 4 * 7) seen.add((px[i] << 16) | (px[i+1] << 8) | px[i+2]);
  done([img.width, img.height, seen.size]);
};
img.onerror = () => done(null);
img.src = 'data:image/png;base64,' + arguments[0];"""


def test_page_renders_in_headless_chromium(page, chromium, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium
    driver.get(page.as_uri())
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(_RENDERED) >= len(FIGURES))
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script("return document.querySelectorAll('#fig-changes .hm image')")
    )
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert all(r.startswith(("file:", "data:", "blob:")) for r in resources), resources
    # the traces were drawn: lines, bars, and the heat map with the right values
    js = "return document.querySelectorAll(arguments[0]).length"
    assert driver.execute_script(js, "#fig-bytes .scatterlayer .trace path.js-line") == 3
    assert driver.execute_script(js, "#fig-shares .barlayer .point path") >= 3 * len(STEPS)
    assert driver.execute_script(js, "#fig-quant .barlayer .point path") == 2
    heat = driver.execute_script(
        "const g = document.getElementById('fig-changes');"
        "return {y: g.data[1].y, v: g.data[1].customdata};"
    )
    w = heat["v"][heat["y"].index("w")]
    assert w == pytest.approx([0.1] * 3, abs=1e-6)
    assert heat["v"][heat["y"].index("frozen")] == [0, 0, 0]
    # a full-page screenshot that is not blank
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd(  # the viewport as tall as the page
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
    shot = tmp_path / "report.png"
    assert driver.save_screenshot(str(shot))
    png = base64.b64encode(shot.read_bytes()).decode()
    width, tall, colours = driver.execute_async_script(_COLOURS, png)
    assert (width, tall) == (1280, height)
    assert colours > 100, f"{colours} distinct colours: blank?"
    if os.environ.get("CKPTSTORE_REPORT_SCREENSHOT"):  # keep it to look at (CI artifact)
        shutil.copy(shot, os.environ["CKPTSTORE_REPORT_SCREENSHOT"])
