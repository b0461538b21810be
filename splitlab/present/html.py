"""Self-contained HTML pages of plotly figures, plotly.js compressed inside.

plotly.js is 4.8 MB (plotly 7); inline as text it is most of a report. Here it is carried once,
gzip-compressed and base64-encoded (2.0 MB), in a ``<script type="application/gzip+base64">``
element, which the browser does not run. ``scripts()`` (the library and a small loader, in the
page's ``<head>``) starts at once: it decodes the library, inflates it with the browser's own
``DecompressionStream('gzip')`` and runs it as a script from a ``blob:`` URL (compiled off the
main thread while the rest of the page is read). Each figure (``figure(fig, id)``) is an empty
div and its JSON (data, layout, config) in a ``<script type="application/json">``; once the
library has run and the page is read, the loader draws them in page order, one
``Plotly.newPlot`` each. Nothing is fetched: the file opens offline.

The figures on the first screen (their top above the window's bottom) are drawn first, and
the browser paints them before the rest are drawn: the page is open then. When every figure
has drawn, the loader sets ``data-figures-drawn`` on ``<html>`` to their number (and
``data-first-screen-drawn`` to the first screen's, when those are); when something failed,
``data-figures-error`` to the message, which each figure not drawn also shows in its place.
``performance`` holds the marks ``splitlab:plotly-inflated``, ``splitlab:plotly-ready``,
``splitlab:first-screen-drawn`` and ``splitlab:figures-drawn``, and a measure
``splitlab:<div id>`` per figure.

What opening costs, in headless Chromium on a 2-core machine: inflating the library ~0.1 s,
compiling and running it ~0.9-1.3 s (all plotly.js, whatever the page draws), then 30-150 ms
per figure (the first ones more: plotly's drawing code is cold). A page that is to open in
under 2 s draws about ten figures; numbers that need no drawing belong in a table.
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
from typing import Any

PLOTLY_ID = "splitlab-plotly-js"
FIGURE_CLASS = "splitlab-figure"  # the class of each figure's JSON <script>
DIV_CLASS = "splitlab-figure-div"
GZIP_TYPE = "application/gzip+base64"

_LOADER = """
(function () {
  var root = document.documentElement;
  function bytesOf(text) {
    if (Uint8Array.fromBase64) return Uint8Array.fromBase64(text);
    var bin = atob(text), out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  function run(tag) {
    return new Promise(function (done, fail) {
      tag.onload = done;
      tag.onerror = function () { fail(new Error('plotly.js did not load')); };
      document.head.appendChild(tag);
    });
  }
  async function loadPlotly() {  // starts at once, while the page below is still being read
    if (window.Plotly) return;
    if (typeof DecompressionStream !== 'function')
      throw new Error('this browser has no DecompressionStream, which unpacks the figures\\' library');
    var packed = bytesOf(document.getElementById('%(lib)s').textContent);  // base64 skips the line breaks
    var stream = new Blob([packed]).stream().pipeThrough(new DecompressionStream('gzip'));
    var code = await new Response(stream).blob();
    performance.mark('splitlab:plotly-inflated');
    // V8's compile hint (plotly's start-up calls most of its functions: compile them all at
    // once); a script from a URL is compiled off the main thread while the page is read
    var url = URL.createObjectURL(new Blob(['//# allFunctionsCalledOnLoad\\n', code], {type: 'text/javascript'}));
    var tag = document.createElement('script');
    tag.src = url;
    try {
      await run(tag);
    } catch (err) {  // a browser that runs no script from a blob: URL here: the text inline
      tag = document.createElement('script');
      tag.textContent = await code.text();
      document.head.appendChild(tag);
    } finally {
      URL.revokeObjectURL(url);
    }
    if (!window.Plotly) throw new Error('plotly.js did not define Plotly');
  }
  var library = loadPlotly();
  library.catch(function () {});  // reported by drawAll
  function specs() { return Array.prototype.slice.call(document.querySelectorAll('script.%(fig)s')); }
  async function draw(tag) {
    var t0 = performance.now(), spec = JSON.parse(tag.textContent);
    await Plotly.newPlot(document.getElementById(tag.dataset.div), spec.data, spec.layout, spec.config);
    performance.measure('splitlab:' + tag.dataset.div, {start: t0});
  }
  function onFirstScreen(tag) {
    return document.getElementById(tag.dataset.div).getBoundingClientRect().top < window.innerHeight;
  }
  function firstScreenDrawn(count) {
    performance.mark('splitlab:first-screen-drawn');
    root.dataset.firstScreenDrawn = String(count);
  }
  async function drawAll() {
    // the figures a reader sees first are drawn first, and the browser paints them (the page
    // is open; with none on the first screen it is open once read); then the rest in page
    // order, without yielding in between: a render between two figures costs more than it shows
    var all = specs(), first = all.filter(onFirstScreen), rest = all.filter(function (t) { return !onFirstScreen(t); });
    if (!first.length) firstScreenDrawn(0);
    await library;
    performance.mark('splitlab:plotly-ready');
    for (var i = 0; i < first.length; i++) await draw(first[i]);
    if (first.length) {  // a frame to paint them; with none drawn there is nothing to wait for
      firstScreenDrawn(first.length);
      await new Promise(function (painted) { requestAnimationFrame(function () { setTimeout(painted, 0); }); });
    }
    for (var j = 0; j < rest.length; j++) await draw(rest[j]);
    performance.mark('splitlab:figures-drawn');
    root.dataset.figuresDrawn = String(all.length);
  }
  function start() {
    drawAll().catch(function (err) {
      var msg = 'Figures not drawn: ' + (err && err.message || err);
      root.dataset.figuresError = msg;
      specs().forEach(function (s) {
        var div = document.getElementById(s.dataset.div);
        if (div && !div.classList.contains('js-plotly-plot')) {
          div.textContent = msg;
          div.className += ' splitlab-figure-error';
        }
      });
      throw err;
    });
  }
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start); else start();
})();
"""


@functools.lru_cache(maxsize=1)
def plotly_js_packed() -> str:
    """The installed plotly package's plotly.min.js, gzip-compressed, base64 (ASCII)."""
    from plotly.offline import get_plotlyjs

    raw = get_plotlyjs().encode("utf-8")
    return base64.b64encode(gzip.compress(raw, compresslevel=9, mtime=0)).decode("ascii")


def plotly_version() -> str:
    import plotly

    return str(plotly.__version__)


def figure(fig, div_id: str, *, height: int | None = None, config: dict | None = None) -> str:
    """One figure: an empty div of its height and its JSON (data, layout, config) beside it,
    drawn by ``scripts()``'s loader. ``div_id`` must be unique in the page."""
    from plotly.io.json import to_json_plotly

    spec: dict[str, Any] = fig.to_dict()
    cfg = {"displaylogo": False, "responsive": True, **(config or {})}
    height = int(height or fig.layout.height or 480)
    # to_json_plotly escapes <, > and / as \\u003c.. : the JSON cannot close its <script>
    data = to_json_plotly({"data": spec.get("data", []), "layout": spec.get("layout", {}), "config": cfg})
    return (f'<div id="{div_id}" class="{DIV_CLASS}" style="height:{height}px;width:100%"></div>'
            f'<script type="application/json" class="{FIGURE_CLASS}" data-div="{div_id}">{data}</script>')


def scripts() -> str:
    """plotly.js (gzip + base64) and the loader that runs it and draws every figure of the
    page: once, in the page's ``<head>`` (anywhere before ``</body>`` works; earlier starts
    the library sooner)."""
    packed = plotly_js_packed()
    lines = "\n".join(packed[i:i + 1024] for i in range(0, len(packed), 1024))
    return (f'<script type="{GZIP_TYPE}" id="{PLOTLY_ID}" data-library="plotly.js {plotly_version()}" '
            f'data-encoding="gzip, base64">\n{lines}\n</script>'
            f"<script>{_LOADER % {'fig': FIGURE_CLASS, 'lib': PLOTLY_ID}}</script>")


def count_figures(page: str) -> int:
    """How many figures a page written with ``figure`` holds."""
    return page.count(f'class="{FIGURE_CLASS}"')


def figure_specs(page: str) -> list[dict]:
    """Every figure's JSON (data, layout, config) in a page written with ``figure``, in order."""
    import re

    pattern = re.compile(rf'<script type="application/json" class="{FIGURE_CLASS}"[^>]*>(.*?)</script>', re.S)
    return [json.loads(m) for m in pattern.findall(page)]


def unpack_plotly_js(page: str) -> str:
    """The plotly.js a page carries, inflated (what the browser runs)."""
    import re

    m = re.search(rf'<script type="{re.escape(GZIP_TYPE)}" id="{PLOTLY_ID}"[^>]*>(.*?)</script>', page, re.S)
    if m is None:
        raise ValueError("the page carries no packed plotly.js")
    return gzip.decompress(base64.b64decode("".join(m.group(1).split()))).decode("utf-8")
