"""A static HTML viewer for trajectory dumps (what `write_trajectories` writes: trajectories*.jsonl + images/).

One self-contained HTML file, no server and no network: per prompt its question, ground truth and the
pass/avg accuracy of its samples; per sample every turn's text, each tool call's box drawn over the image it
was cut from, the crop that came back (model-side), tool errors, reward/score/accuracy/advantage and the
flags (exceed, void, truncated, end_reason). Plain-JS filters (data source, correct/incorrect, flags) and a
"showing K of N trajectories" counter. Works for eval dumps (RUN_DIR/eval/step_N/trajectories.jsonl: extras
score, accuracy, reward_failed, reward_error) and training rollout dumps (RUN_DIR/rollouts/step_N, one
trajectories_handle<i>.jsonl per rollout handle: also advantage, kept, step, round); missing extras are left
out. A directory is read whole (every trajectories*.jsonl in it); samples are grouped by (uid, round).

Images are linked by relative path from the HTML file (default) or embedded as data URIs (`embed=True`, each
file once, set by a small script). Boxes are drawn as absolutely positioned `div.zoom-box` elements in
percentages of the source image: box / raw size, the raw size taken from the image entry's `raw_size` when
present, else read from the raw image file (the prompt image at `path`, resolved against the current
directory, then the dump directory and its ancestors; a crop's `raw_file`).

CLI: tools/view_trajectories.py.
"""
from __future__ import annotations

import base64
import html
import json
import mimetypes
import os
import re
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from PIL import Image

# Keys of a dump line that are not shown as text (large) or shown by their own widgets.
_DROPPED_KEYS = ("token_ids", "loss_mask", "rollout_logprobs")
_KNOWN_KEYS = {
    "uid", "sample_index", "data_source", "question", "ground_truth", "verifier", "prompt_length",
    "attention_length", "images", "turns", "turn_texts", "exceed", "void", "truncated", "end_reason",
    "total_s", "timings", "num_turns", "num_tool_calls", "num_tool_errors", "score", "accuracy",
    "reward_failed", "reward_error", "advantage", "kept", "step", "round", *_DROPPED_KEYS,
}
CORRECT_THRESHOLD = 0.5  # accuracy >= this counts as correct (as pass@k in trainer/eval.py avg_at_k)


@dataclass
class ViewerStats:
    """What build_viewer wrote."""

    out_path: Path
    num_prompts: int
    num_trajectories: int
    num_boxes: int  # drawn zoom boxes: tool calls that returned a crop
    num_missing_images: int  # image files that could not be found (shown as placeholders)
    num_approximate_boxes: int  # boxes whose source's raw size was unknown (drawn against the model-side size)


def find_jsonl(path: str | Path) -> list[Path]:
    """The trajectory files of a dump: `path` itself when it is a file, else every trajectories*.jsonl in
    the directory (an eval dump's trajectories.jsonl, a training dump's trajectories_handle<i>.jsonl)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such dump directory or file")
    found = sorted(path.glob("trajectories*.jsonl"))
    if found:
        return found
    others = sorted(p.name for p in path.glob("*.jsonl"))
    hint = f" (found {', '.join(others)}; pass the file itself)" if others else ""
    raise FileNotFoundError(f"{path}: no trajectories*.jsonl{hint}")


def read_records(jsonl: Path, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The dump's lines without the token-level arrays."""
    records = []
    with jsonl.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{jsonl}:{number}: not JSON ({exc})") from None
            for key in _DROPPED_KEYS:
                record.pop(key, None)
            records.append(record)
            if progress is not None and number % 500 == 0:
                progress(f"read {number} lines")
    return records


class _Images:
    """Resolves image files, reads their sizes, and makes their `src` (relative link or embedded data)."""

    def __init__(self, dump_dir: Path, html_dir: Path, embed: bool) -> None:
        self.dump_dir = dump_dir.resolve()
        self.html_dir = html_dir.resolve()
        self.embed = embed
        self._sizes: dict[Path, tuple[int, int] | None] = {}
        self._prompts: dict[str, Path | None] = {}
        self._embedded: dict[Path, str] = {}  # path -> key in the embedded table
        self.embedded_data: dict[str, str] = {}
        self.missing: set[str] = set()

    def in_dump(self, relative: str | None) -> Path | None:
        if not relative:
            return None
        path = self.dump_dir / relative
        if path.is_file():
            return path
        self.missing.add(str(path))
        return None

    def prompt_raw(self, path: str | None) -> Path | None:
        """A prompt image's `path`: absolute, or relative to the directory the run started in (tried: the
        current directory, then the dump directory and each of its ancestors)."""
        if not path:
            return None
        if path not in self._prompts:
            self._prompts[path] = self._find_prompt(Path(path))
        return self._prompts[path]

    def _find_prompt(self, candidate: Path) -> Path | None:
        if candidate.is_absolute():
            return candidate if candidate.is_file() else None
        for base in (Path.cwd(), self.dump_dir, *self.dump_dir.parents):
            if (base / candidate).is_file():
                return (base / candidate).resolve()
        return None

    def size(self, path: Path | None) -> tuple[int, int] | None:
        if path is None:
            return None
        if path not in self._sizes:
            try:
                with Image.open(path) as image:
                    self._sizes[path] = image.size
            except (OSError, ValueError):
                self._sizes[path] = None
        return self._sizes[path]

    def img(self, path: Path | None, alt: str, css_class: str = "") -> str:
        """An <img> for `path`, or a visible placeholder when the file is missing."""
        cls = f' class="{css_class}"' if css_class else ""
        if path is None:
            return f'<span class="missing{(" " + css_class) if css_class else ""}">image missing: {_e(alt)}</span>'
        if self.embed:
            key = self._embedded.get(path)
            if key is None:
                key = f"i{len(self._embedded)}"
                self._embedded[path] = key
                mime = mimetypes.guess_type(path.name)[0] or "image/png"
                self.embedded_data[key] = f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
            return f'<img{cls} data-img="{key}" alt="{_e(alt)}">'
        return f'<img{cls} src="{_e(self.href(path))}" alt="{_e(alt)}">'

    def href(self, path: Path) -> str:
        """`path` relative to the HTML file, URL-quoted (works from file://)."""
        return urllib.parse.quote(Path(os.path.relpath(path, self.html_dir)).as_posix())


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


_TAG_RE = re.compile(r"(</?(?:think|grounding|answer|tool_call)>)")


def _turn_text_html(text: str) -> str:
    """HTML-escaped text with the protocol tags highlighted."""
    parts = []
    for piece in _TAG_RE.split(text):
        if _TAG_RE.fullmatch(piece):
            parts.append(f'<span class="tag">{_e(piece)}</span>')
        else:
            parts.append(_e(piece))
    return "".join(parts)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _correct(record: dict[str, Any]) -> bool | None:
    accuracy = record.get("accuracy")
    if not isinstance(accuracy, (int, float)):
        return None
    return accuracy >= CORRECT_THRESHOLD


def _image_name(images: list[dict[str, Any]], index: int) -> str:
    if index == 0:
        return "original_image"
    return f"observation_{index}"


def _crop_for_turns(record: dict[str, Any]) -> list[int | None]:
    """For each turn, the index of the image its tool call returned (None: no crop). A crop comes from each
    tool call without an error, except the final call of an exceeded trajectory (never executed, or
    rolled back); crops are appended to the image list in turn order."""
    turns = record.get("turns") or []
    crops = [i for i, image in enumerate(record.get("images") or []) if image.get("origin") == "crop"]
    out: list[int | None] = []
    for number, turn in enumerate(turns):
        last = number == len(turns) - 1
        executed = turn.get("tool_call") and turn.get("tool_error") is None and not (record.get("exceed") and last)
        out.append(crops.pop(0) if executed and crops else None)
    return out


class _Renderer:
    def __init__(self, images: _Images) -> None:
        self.images = images
        self.num_boxes = 0
        self.num_approximate = 0

    def _source_view(self, record: dict[str, Any], index: int) -> tuple[Path | None, tuple[int, int] | None, bool]:
        """(file to show, raw size, size exact?) of image `index` of a trajectory."""
        entry = record["images"][index]
        if entry.get("origin") == "prompt":
            shown = self.images.prompt_raw(entry.get("path"))
        else:
            shown = self.images.in_dump(entry.get("raw_file"))
        if shown is None:
            shown = self.images.in_dump(entry.get("model_file"))
        raw_size = entry.get("raw_size")
        if raw_size:
            return shown, (int(raw_size[0]), int(raw_size[1])), True
        if entry.get("origin") == "prompt":
            raw = self.images.prompt_raw(entry.get("path"))
            if raw is not None:
                return shown, self.images.size(raw), True
        else:
            raw = self.images.in_dump(entry.get("raw_file"))
            if raw is not None:
                return shown, self.images.size(raw), True
        return shown, self.images.size(shown), False

    def zoom(self, record: dict[str, Any], crop_index: int) -> str:
        images = record["images"]
        crop = images[crop_index]
        source_index = crop.get("source_index")
        box = crop.get("box")
        crop_img = self.images.img(self.images.in_dump(crop.get("model_file")), f"crop {crop_index}", "crop-img")
        raw_link = ""
        raw_path = self.images.in_dump(crop.get("raw_file"))
        if raw_path is not None and not self.images.embed:
            raw_link = f' · <a href="{_e(self.images.href(raw_path))}">raw</a>'
        crop_size = self.images.size(self.images.in_dump(crop.get("model_file")))
        crop_caption = (
            f"returned {_image_name(images, crop_index)}"
            + (f" · model-side {crop_size[0]}&times;{crop_size[1]}" if crop_size else "")
            + raw_link
        )
        if source_index is None or box is None or not 0 <= source_index < len(images):
            source_html = f'<span class="missing">no source recorded (source_index={_e(source_index)}, box={_e(box)})</span>'
        else:
            shown, size, exact = self._source_view(record, source_index)
            left, top, right, bottom = (float(v) for v in box)
            img = self.images.img(shown, f"image {source_index}", "src-img")
            if size is None or shown is None:
                box_html = ""
                note = " · source size unknown, box not drawn"
            else:
                width, height = size
                style = (
                    f"left:{100 * left / width:.4f}%;top:{100 * top / height:.4f}%;"
                    f"width:{100 * (right - left) / width:.4f}%;height:{100 * (bottom - top) / height:.4f}%"
                )
                self.num_boxes += 1
                if not exact:
                    self.num_approximate += 1
                box_html = (
                    f'<div class="zoom-box{"" if exact else " approx"}" style="{style}" '
                    f'data-box="{int(left)},{int(top)},{int(right)},{int(bottom)}" '
                    f'data-raw-size="{width},{height}" data-source-index="{source_index}" '
                    f'data-crop-index="{crop_index}" title="box {_e(box)} of {width}x{height}"></div>'
                )
                note = f" · raw {width}&times;{height}"
                if not exact:
                    note += " (raw size unknown: model-side size used, box approximate)"
            source_html = (
                f'<div class="imgbox">{img}{box_html}</div>'
                f"<figcaption>on {_image_name(images, source_index)} · box {_e(list(box))}{note}</figcaption>"
            )
        return (
            '<div class="zoom">'
            f'<figure class="src">{source_html}</figure>'
            '<div class="arrow">&rarr;</div>'
            f'<figure class="crop">{crop_img}<figcaption>{crop_caption}</figcaption></figure>'
            "</div>"
        )

    def trajectory(self, record: dict[str, Any]) -> str:
        correct = _correct(record)
        turns = record.get("turns") or []
        texts = record.get("turn_texts") or []
        num_errors = sum(turn.get("tool_error") is not None for turn in turns)
        exceed = bool(record.get("exceed"))
        flags = {
            "exceed": exceed,
            "void": bool(record.get("void")),
            "truncated": bool(record.get("truncated")),
            "tool-error": num_errors > 0,
            "reward-failed": bool(record.get("reward_failed")),
            "dropped": record.get("kept") is False,  # training dumps: the group was filtered out (not trained on)
        }
        attrs = {
            "data-uid": record.get("uid", ""),
            "data-sample": record.get("sample_index", ""),
            "data-source": record.get("data_source", ""),
            "data-correct": "" if correct is None else str(int(correct)),
            **{f"data-{name}": str(int(value)) for name, value in flags.items()},
        }
        badges = []
        if correct is not None:
            badges.append(f'<span class="badge {"ok" if correct else "bad"}">{"correct" if correct else "incorrect"}</span>')
        for name, value in flags.items():
            if value:
                badges.append(f'<span class="badge flag">{name}</span>')
        badges.append(f'<span class="badge end">end: {_e(record.get("end_reason", "?"))}</span>')
        numbers = []
        if "round" in record:
            numbers.append(f"round {_e(record['round'])}")
        for key in ("accuracy", "score", "advantage"):
            if isinstance(record.get(key), (int, float)):
                numbers.append(f"{key} <b>{_fmt(record[key])}</b>")
        num_calls = sum(bool(t.get("tool_call")) for t in turns)
        numbers.append(f"turns {len(turns)} · tool calls {num_calls} · tool errors {num_errors}")
        if isinstance(record.get("total_s"), (int, float)):
            numbers.append(f"{record['total_s']:.1f} s")
        extras = [f"{_e(key)}={_e(_fmt(value))[:200]}" for key, value in record.items() if key not in _KNOWN_KEYS]
        body = []
        if record.get("reward_error"):
            body.append(f'<div class="reward-error">reward error: {_e(record["reward_error"])}</div>')
        if extras:
            body.append(f'<div class="extras">{" · ".join(extras)}</div>')
        crops = _crop_for_turns(record)
        for number, turn in enumerate(turns):
            text = texts[number] if number < len(texts) else ""
            head = (
                f"turn {number + 1} · {_e(turn.get('num_generated_tokens', '?'))} tokens · "
                f"finish {_e(turn.get('finish_reason', '?'))}" + (" · tool call" if turn.get("tool_call") else "")
            )
            parts = [f'<div class="turn-head">{head}</div>', f'<pre class="text">{_turn_text_html(text)}</pre>']
            if turn.get("tool_error") is not None:
                parts.append(f'<div class="tool-error">tool error: {_e(turn["tool_error"])}</div>')
            if crops[number] is not None:
                parts.append(self.zoom(record, crops[number]))
            elif turn.get("tool_call") and turn.get("tool_error") is None and number == len(turns) - 1 and exceed:
                reason = _e(record.get("end_reason", "?"))
                parts.append(f'<div class="not-run">no observation: the trajectory ended here (exceed: {reason})</div>')
            body.append(f'<div class="turn">{"".join(parts)}</div>')
        used = {i for i in crops if i is not None}
        for index, image in enumerate(record.get("images") or []):
            if image.get("origin") == "crop" and index not in used:  # should not happen; shown rather than lost
                body.append(f'<div class="turn"><div class="turn-head">crop {index} not matched to a turn</div>'
                            f"{self.zoom(record, index)}</div>")
        attr_html = " ".join(f'{name}="{_e(value)}"' for name, value in attrs.items())
        return (
            f'<div class="traj" {attr_html}>'
            f'<div class="traj-head"><b>sample {_e(record.get("sample_index", "?"))}</b> {" ".join(badges)} '
            f'<span class="numbers">{" · ".join(numbers)}</span></div>'
            f'{"".join(body)}</div>'
        )

    def prompt(self, records: list[dict[str, Any]]) -> str:
        first = records[0]
        accuracies = [r["accuracy"] for r in records if isinstance(r.get("accuracy"), (int, float))]
        if accuracies:
            summary = (
                f"pass {int(max(accuracies) >= CORRECT_THRESHOLD)} · avg accuracy {sum(accuracies) / len(accuracies):.3f}"
                f" over {len(accuracies)} samples"
            )
        else:
            summary = f"{len(records)} samples (no accuracy recorded)"
        prompt_images = [
            (i, image) for i, image in enumerate(first.get("images") or []) if image.get("origin") == "prompt"
        ]
        figures = []
        for index, image in prompt_images:
            shown = self.images.prompt_raw(image.get("path")) or self.images.in_dump(image.get("model_file"))
            figures.append(
                f'<figure class="prompt-img">{self.images.img(shown, f"prompt image {index}", "src-img")}'
                f"<figcaption>{_image_name(first['images'], index)}: {_e(image.get('path') or '')}</figcaption></figure>"
            )
        heading = _e(first.get("data_source", ""))
        if "round" in first:
            heading += f" · round {_e(first['round'])}"
        if first.get("kept") is False:
            heading += " · dropped (not kept)"
        return (
            f'<section class="prompt" data-uid="{_e(first.get("uid", ""))}" data-source="{_e(first.get("data_source", ""))}">'
            f'<h2>{_e(first.get("uid", "?"))} <span class="source">{heading}</span></h2>'
            f'<div class="meta">verifier {_e(first.get("verifier"))} · {summary}</div>'
            f'<div class="qa"><div class="question"><b>question</b><pre>{_e(first.get("question", ""))}</pre></div>'
            f'<div class="truth"><b>ground truth</b><pre>{_e(first.get("ground_truth", ""))}</pre></div></div>'
            f'<div class="prompt-imgs">{"".join(figures)}</div>'
            f'{"".join(self.trajectory(r) for r in records)}</section>'
        )


def _source_table(groups: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    by_source: dict[str, list[list[dict[str, Any]]]] = {}
    for records in groups.values():
        by_source.setdefault(records[0].get("data_source", ""), []).append(records)
    rows = []
    for source in sorted(by_source):
        prompts = by_source[source]
        samples = [r for records in prompts for r in records]
        accuracy = [[r["accuracy"] for r in rs if isinstance(r.get("accuracy"), (int, float))] for rs in prompts]
        scored = [a for a in accuracy if a]
        avg = f"{sum(sum(a) / len(a) for a in scored) / len(scored):.3f}" if scored else "-"
        passed = f"{sum(max(a) >= CORRECT_THRESHOLD for a in scored) / len(scored):.3f}" if scored else "-"
        rate = lambda key: f"{sum(bool(r.get(key)) for r in samples) / len(samples):.3f}"  # noqa: E731
        rows.append(
            f"<tr><td>{_e(source)}</td><td>{len(prompts)}</td><td>{len(samples)}</td><td>{avg}</td><td>{passed}</td>"
            f"<td>{rate('exceed')}</td><td>{rate('void')}</td><td>{rate('truncated')}</td></tr>"
        )
    return (
        '<table class="sources"><tr><th>data source</th><th>prompts</th><th>samples</th><th>avg acc</th>'
        "<th>pass</th><th>exceed</th><th>void</th><th>truncated</th></tr>" + "".join(rows) + "</table>"
    )


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#f4f4f6}
header{background:#fff;padding:8px 16px 0}
.filters{position:sticky;top:0;z-index:10;background:#fff;border-bottom:1px solid #ccc;padding:6px 16px}
header h1{font-size:17px;margin:0 0 4px}
main{padding:8px 16px}
[hidden]{display:none!important}
.filters label{margin-right:14px}
#counter{font-weight:bold;margin-left:8px}
table.sources{border-collapse:collapse;margin:6px 0;font-size:12px}
table.sources td,table.sources th{border:1px solid #ccc;padding:2px 6px;text-align:right}
table.sources td:first-child{text-align:left}
section.prompt{background:#fff;border:1px solid #ccc;border-radius:6px;margin:12px 0;padding:8px 12px}
section.prompt h2{font-size:15px;margin:0}
.source{font-weight:normal;color:#666;font-size:13px}
.meta{color:#555;font-size:12px;margin:2px 0 6px}
.qa{display:flex;gap:16px;flex-wrap:wrap}
.qa pre{white-space:pre-wrap;margin:2px 0;background:#f7f7f7;padding:4px 6px;max-width:700px}
.prompt-imgs{display:flex;gap:8px;flex-wrap:wrap}
figure{margin:4px 0}
figcaption{font-size:11px;color:#555;max-width:360px;word-break:break-all}
.traj{border-top:1px dashed #bbb;margin-top:8px;padding-top:6px}
.traj-head{margin-bottom:4px}
.numbers{color:#444;font-size:12px;margin-left:6px}
.badge{display:inline-block;border-radius:3px;padding:0 5px;font-size:11px;margin-right:3px;background:#ddd}
.badge.ok{background:#c8f0c8}.badge.bad{background:#f6caca}.badge.flag{background:#ffe2a8}
.turn{margin:4px 0 4px 14px;padding-left:8px;border-left:3px solid #dde}
.turn-head{font-size:11px;color:#666}
pre.text{white-space:pre-wrap;word-break:break-word;margin:2px 0;background:#fafaff;padding:4px 6px}
.tag{color:#1a57b0;font-weight:bold}
.tool-error,.reward-error{color:#a00;font-size:12px;white-space:pre-wrap}
.not-run{color:#a60;font-size:12px}
.extras{color:#555;font-size:11px}
.zoom{display:flex;align-items:center;gap:10px;flex-wrap:wrap}
.arrow{font-size:22px;color:#888}
.imgbox{position:relative;display:inline-block;line-height:0}
.imgbox img,.prompt-img img{display:block;max-width:360px;max-height:280px}
img.crop-img{display:block;max-width:240px;max-height:240px;border:1px solid #999}
.zoom-box{position:absolute;box-sizing:border-box;border:2px solid #e0115f;background:rgba(224,17,95,.08)}
.zoom-box.approx{border-style:dashed}
.missing{display:inline-block;padding:20px;background:#eee;color:#a00;font-size:11px}
"""

_JS = """
(function(){
  var table = document.getElementById('embedded-images');
  if (table) {
    var data = JSON.parse(table.textContent);
    document.querySelectorAll('img[data-img]').forEach(function(img){ img.src = data[img.getAttribute('data-img')]; });
  }
  var trajs = Array.prototype.slice.call(document.querySelectorAll('.traj'));
  var prompts = Array.prototype.slice.call(document.querySelectorAll('section.prompt'));
  var FLAGS = ['exceed', 'void', 'truncated', 'toolError', 'rewardFailed', 'dropped'];
  var fSource = document.getElementById('f-source'), fCorrect = document.getElementById('f-correct'),
      fFlag = document.getElementById('f-flag');
  function apply(){
    var source = fSource.value, correct = fCorrect.value, flag = fFlag.value, shown = 0;
    trajs.forEach(function(t){
      var d = t.dataset, ok = true;
      if (source && d.source !== source) ok = false;
      if (correct === 'correct' && d.correct !== '1') ok = false;
      if (correct === 'incorrect' && d.correct !== '0') ok = false;
      if (flag === 'clean') { if (FLAGS.some(function(name){ return d[name] === '1'; })) ok = false; }
      else if (flag && d[flag] !== '1') ok = false;
      t.hidden = !ok;
      if (ok) shown++;
    });
    prompts.forEach(function(p){ p.hidden = !p.querySelector('.traj:not([hidden])'); });
    document.getElementById('shown').textContent = shown;
  }
  [fSource, fCorrect, fFlag].forEach(function(el){ el.addEventListener('change', apply); });
  apply();
})();
"""


def _group_key(record: dict[str, Any]) -> tuple[str, str]:
    """A prompt's samples: same uid and, in training dumps, the same generation round."""
    return str(record.get("uid", "")), str(record.get("round", ""))


def render_html(records: list[dict[str, Any]], images: _Images, title: str,
                progress: Callable[[str], None] | None = None) -> tuple[str, _Renderer, int, int]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(_group_key(record), []).append(record)
    renderer = _Renderer(images)
    sections = []
    for number, group in enumerate(groups.values(), 1):
        group.sort(key=lambda r: r.get("sample_index", 0))
        sections.append(renderer.prompt(group))
        if progress is not None and number % 100 == 0:
            progress(f"rendered {number}/{len(groups)} prompts")
    sources = sorted({str(r.get("data_source", "")) for r in records})
    source_options = '<option value="">all</option>' + "".join(f'<option value="{_e(s)}">{_e(s)}</option>' for s in sources)
    flag_options = "".join(
        f'<option value="{value}">{label}</option>'
        for value, label in (("", "any"), ("exceed", "exceed"), ("void", "void"), ("truncated", "truncated"),
                             ("toolError", "tool error"), ("rewardFailed", "reward failed"),
                             ("dropped", "dropped (not kept)"), ("clean", "none of these"))
        if value != "dropped" or any(r.get("kept") is False for r in records)
    )
    embedded = ""
    if images.embed:
        payload = json.dumps(images.embedded_data).replace("</", "<\\/")
        embedded = f'<script type="application/json" id="embedded-images">{payload}</script>'
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1>{_source_table(groups)}</header>"
        '<div class="filters">'
        f'<label>data source <select id="f-source">{source_options}</select></label>'
        '<label>answer <select id="f-correct"><option value="all">all</option><option value="correct">correct</option>'
        '<option value="incorrect">incorrect</option></select></label>'
        f'<label>flag <select id="f-flag">{flag_options}</select></label>'
        f'<span id="counter">showing <span id="shown">{len(records)}</span> of '
        f'<span id="total">{len(records)}</span> trajectories</span>'
        "</div>"
        f'<main>{"".join(sections)}</main>{embedded}<script>{_JS}</script></body></html>\n'
    )
    return page, renderer, len(groups), len(records)


def build_viewer(
    dump: str | Path,
    out: str | Path | None = None,
    *,
    max_prompts: int | None = None,
    embed: bool = False,
    log: TextIO | None = sys.stderr,
) -> ViewerStats:
    """Write the HTML viewer of a dump (its directory or its jsonl file); `out` defaults to
    DUMP_DIR/trajectories.html. `max_prompts` keeps the first N prompts (by first appearance)."""
    started = time.perf_counter()

    def progress(message: str) -> None:
        if log is not None:
            print(f"[view_trajectories] {message} ({time.perf_counter() - started:.1f} s)", file=log, flush=True)

    files = find_jsonl(dump)
    dump_dir = files[0].parent
    out_path = Path(out) if out is not None else dump_dir / "trajectories.html"
    records = [record for jsonl in files for record in read_records(jsonl, progress)]
    if max_prompts is not None:
        keep: set[tuple[str, str]] = set()
        kept = []
        for record in records:
            key = _group_key(record)
            if key not in keep and len(keep) < max_prompts:
                keep.add(key)
            if key in keep:
                kept.append(record)
        records = kept
    out_path.parent.mkdir(parents=True, exist_ok=True)
    images = _Images(dump_dir, out_path.parent, embed)
    title = f"trajectories: {files[0].resolve() if len(files) == 1 else f'{dump_dir.resolve()} ({len(files)} files)'}"
    page, renderer, num_prompts, num_trajectories = render_html(records, images, title, progress)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out_path)
    stats = ViewerStats(
        out_path=out_path,
        num_prompts=num_prompts,
        num_trajectories=num_trajectories,
        num_boxes=renderer.num_boxes,
        num_missing_images=len(images.missing),
        num_approximate_boxes=renderer.num_approximate,
    )
    progress(
        f"wrote {out_path}: {num_prompts} prompts, {num_trajectories} trajectories, {renderer.num_boxes} boxes"
        + (f", {stats.num_missing_images} missing image files" if stats.num_missing_images else "")
        + (f", {stats.num_approximate_boxes} boxes with an approximate scale" if stats.num_approximate_boxes else "")
    )
    return stats
