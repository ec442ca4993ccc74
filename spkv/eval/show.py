"""`spkv show`: what each layer and KV head keeps, on the user's own text.

The keep map comes from the real compressed cache after a chunked prefill of the text: for every
gated layer and KV head, the token positions it physically holds (stored pairs plus the window),
read from the cache itself (SPKVLayer.kept_positions), so the picture is the cache, not a model of
it. The page is one self-contained HTML file (data inline, no network): the text with the kept
tokens highlighted, a layer / head selector (also settable as #layer=L&head=H in the address), the
density heatmap and the memory report. The PNG shows every head's keep map at once.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spkv.bench.common import chunked_prefill
from spkv.cache import SPKVCache
from spkv.results import atomic_write_text, pyplot, save_figure
from spkv.stats import cache_stats


@dataclass
class KeepMap:
    tokens: list[str]  # the text's tokens, decoded one by one
    layers: list[int]  # gated layers, in order
    kept: torch.Tensor  # [layers, Hkv, T] bool: the pair is held by the cache after the text
    window: int
    threshold: float
    stats: dict[str, Any]  # cache_stats(...).to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "layers": self.layers, "window": self.window, "threshold": self.threshold,
                "kept": [[[i for i, k in enumerate(row) if k] for row in layer] for layer in self.kept.tolist()],
                "stats": self.stats}


def keep_map(model: torch.nn.Module, tokenizer: Any, text: str, prefill_chunk: int = 512) -> KeepMap:
    """Prefill `text` through an SPKVCache and read back which pairs every gated head holds."""
    ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    if ids.shape[1] < 2:
        raise ValueError("The text is too short to show: give at least a sentence.")
    cache = SPKVCache(model)
    chunked_prefill(model, cache, ids, prefill_chunk)
    layers = [layer for layer in cache.spkv_layers() if layer.is_initialized]
    t = ids.shape[1]
    kept = torch.zeros(len(layers), layers[0].num_kv_heads, t, dtype=torch.bool)
    for li, layer in enumerate(layers):
        for h in range(layer.num_kv_heads):
            kept[li, h, layer.kept_positions(0, h)] = True
    tokens = [tokenizer.decode([int(i)]) for i in ids[0]]
    return KeepMap(tokens, [layer.layer_idx for layer in layers], kept, model.spkv_config.window,
                   model.spkv_config.threshold, cache_stats(cache).to_dict())


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def figure(result: KeepMap) -> Any:
    """Every gated head's keep map (rows) over the text (columns), and the density heatmap."""
    plt = pyplot()
    layers, heads, t = result.kept.shape
    fig, (ax_map, ax_heat) = plt.subplots(1, 2, figsize=(12, max(2.5, 0.18 * layers * heads + 1)),
                                          gridspec_kw={"width_ratios": [4, 1]})
    ax_map.imshow(result.kept.reshape(layers * heads, t).float().numpy(), aspect="auto", cmap="Greys", interpolation="nearest")
    ax_map.set_xlabel("token position")
    ax_map.set_ylabel("layer / KV head")
    ax_map.set_yticks(range(0, layers * heads, heads), [str(layer) for layer in result.layers])
    ax_map.set_title(f"pairs held after {t} tokens (dark = kept; the last {result.window} are the window)", fontsize=9)
    density = torch.tensor(result.stats["density_per_layer_head"], dtype=torch.float)
    image = ax_heat.imshow(density.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax_heat.set_title(f"density, mean {100 * result.stats['density']:.1f}%", fontsize=9)
    ax_heat.set_xlabel("KV head")
    ax_heat.set_yticks(range(layers), [str(layer) for layer in result.layers])
    fig.colorbar(image, ax=ax_heat)
    return fig


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>spkv show</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 70em; }}
#text {{ font-family: monospace; white-space: pre-wrap; line-height: 1.6; border: 1px solid #ccc; padding: 1em; }}
#text span.kept {{ background: #ffd54f; }} #text span.window {{ background: #aed581; }}
#text span.dropped {{ color: #999; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }}
</style></head><body>
<h1>What the SP-KV cache keeps</h1>
<p>{summary}</p>
<p>Layer <select id="layer"></select> KV head <select id="head"></select>
<span id="count"></span></p>
<p><span style="background:#ffd54f">kept beyond the window</span> <span style="background:#aed581">in the window</span>
<span style="color:#999">dropped</span></p>
<div id="text"></div>
<h2>Density per layer and KV head</h2>
<img alt="keep maps and density heatmap" src="data:image/png;base64,{png}">
<h2>Memory</h2>
<table>{memory}</table>
<script id="data" type="application/json">{data}</script>
<script>
const data = JSON.parse(document.getElementById("data").textContent);
const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
data.layers.forEach((l, i) => layerSel.add(new Option(String(l), String(i))));
for (let h = 0; h < data.kept[0].length; h++) headSel.add(new Option(String(h), String(h)));
const text = document.getElementById("text");
const spans = data.tokens.map((tok, i) => {{ const s = document.createElement("span"); s.textContent = tok;
  s.dataset.index = i; text.appendChild(s); return s; }});
const first = data.tokens.length - data.window + 1;  // the next query's window starts here
function show() {{
  const kept = new Set(data.kept[+layerSel.value][+headSel.value]);
  let n = 0;
  spans.forEach((s, i) => {{ s.className = !kept.has(i) ? "dropped" : (i >= first ? "window" : "kept"); n += kept.has(i); }});
  document.getElementById("count").textContent = n + " of " + spans.length + " tokens held";
  history.replaceState(null, "", "#layer=" + data.layers[+layerSel.value] + "&head=" + headSel.value);
}}
const hash = new URLSearchParams(location.hash.slice(1));
if (hash.has("layer")) layerSel.value = String(Math.max(0, data.layers.indexOf(+hash.get("layer"))));
if (hash.has("head")) headSel.value = hash.get("head");
layerSel.onchange = headSel.onchange = show;
show();
</script></body></html>
"""


def render_html(result: KeepMap, png_b64: str) -> str:
    s = result.stats
    mib = 2**20
    summary = (f"{len(result.tokens)} tokens, tau {result.threshold:g}, window {result.window}: density "
               f"{100 * s['density']:.1f}% (mean over layers x heads), {100 * s['density_token_weighted']:.1f}% token-weighted.")
    memory = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in (
        ("KV held by gated layers", f"{s['bytes_held'] / mib:.2f} MiB"), ("a full cache of those layers", f"{s['bytes_full'] / mib:.2f} MiB"),
        ("compression", f"{s['compression']:.2f}x"), ("pairs kept / decided", f"{s['kept']} / {s['decided']}")))
    data = json.dumps(result.to_dict()).replace("</", "<\\/")  # no </script> inside the data
    return _PAGE.format(summary=html.escape(summary), png=png_b64, memory=memory, data=data)


def write_show(result: KeepMap, out: str | Path) -> dict[str, Path]:
    """show.html (self-contained), show.png and show.json under `out`."""
    from spkv.results import write_json

    out = Path(out)
    fig = figure(result)
    png = save_figure(fig, out / "show.png")
    page = atomic_write_text(out / "show.html", render_html(result, _png(fig)))
    pyplot().close(fig)
    return {"html": page, "png": png, "json": write_json(out / "show.json", result.to_dict())}
