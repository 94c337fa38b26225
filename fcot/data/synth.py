"""Synthetic text-rich documents with question-answer pairs: ``fcot data synth``.

Four kinds of page, rendered with PIL's built-in font (nothing is downloaded):

- ``grid``: words and numbers in a grid; "what is in row r, column c?";
- ``table``: items with quantity, unit price and line total; look-ups and an arg-max;
- ``chart``: a labelled bar chart; a value, the largest bar, a difference;
- ``receipt``: a shop receipt; an item's price, the number of items, the total.

Every answer is read off the page, so a model must resolve the text to answer. With
``cot=True`` each answer is a short rationale followed by ``Answer: ...``.

Deterministic: record ``i`` is drawn from its own generator seeded with ``(seed, i)``, so the same
settings give byte-identical JSONL and PNGs, and any prefix of a run equals a shorter run.

How much text one visual token has to carry is the knob that matters for compression. An
image is cut into 448px tiles (:mod:`fcot.data.tiling`) of 256 visual tokens each, 128 / 64
once 50 % / 75 % of them are merged away; at 64 one token stands for a 56x56 px patch. The
``dense`` preset (896x896 px, font 10 px, density 1.0: 2x2 tiles + thumbnail) draws about
5,000-5,800 characters on a grid or table page, 1,000 on a receipt, so a grid page puts about 4
characters on each visual token uncompressed and over 15 at 75 % (four or five text lines per
token): there, dropping visual tokens loses text. The ``sparse`` preset (448x448, font 24 px,
density 0.4: one tile, 30-110 characters) stays near one character per token even at 75 %.
Each run's ``synth.json`` reports its measured characters per visual token at 256, 128 and 64
tokens per tile (dense, all four kinds mixed: about 2.5 / 4.9 / 9.9; sparse: 0.27 / 0.54 / 1.1).

Speed, one CPU core: about 9,000 images a minute at 448x448 (sparse), 1,600 at 896x896 with the
default font, 800 for dense pages (FreeType renders each string; that dominates).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw, ImageFont

from fcot.data.tiling import num_tiles

KINDS = ("grid", "table", "chart", "receipt")

PRESETS: dict[str, dict] = {
    # Text-rich: 75 % compression leaves over ten characters per visual token.
    "dense": {"width": 896, "height": 896, "font_size": 10, "density": 1.0},
    # Large print on one tile: compression should cost little.
    "sparse": {"width": 448, "height": 448, "font_size": 24, "density": 0.4},
}

_WORDS = (
    "apple river stone cloud maple orbit candle harbor pepper silver garden window bridge copper lemon "
    "forest planet rocket violet meadow canyon falcon marble pencil ribbon saddle tunnel velvet walnut "
    "anchor basket cactus dragon engine feather glacier hammer island jacket kettle ladder magnet needle "
    "oyster parrot quartz rabbit sailor timber umbrella valley wizard yogurt zebra almond beacon cobalt "
    "dolphin ember fossil granite hazel indigo jasmine kernel lantern mosaic nectar olive pebble quiver "
    "raven sierra thistle tulip vertex willow yarrow cedar delta echo fjord gamma helix iris juniper koala"
).split()
_ITEMS = ("bread milk eggs rice coffee tea butter cheese apples pasta tomatoes onions sugar flour honey "
          "yogurt lemons beans soap pencils batteries napkins juice salt pepper oats").split()
_SHOPS = ("CORNER MARKET", "NORTH STAR GROCERY", "BLUE DOOR CAFE", "HILLSIDE PHARMACY", "MAPLE HARDWARE")
_CATEGORIES = ("North", "South", "East", "West", "Alpha", "Beta", "Gamma", "Delta", "Q1", "Q2", "Q3", "Q4")
_COLORS = ((66, 103, 178), (219, 68, 55), (244, 160, 0), (15, 157, 88), (120, 80, 160), (0, 150, 160))


@dataclass(frozen=True)
class SynthConfig:
    """Settings of one ``fcot data synth`` run (all written to ``synth.json``)."""

    n: int
    """How many images (records) to write."""
    seed: int = 0
    """Seed; the same settings and seed give byte-identical output."""
    width: int = 896
    """Image width in pixels."""
    height: int = 896
    """Image height in pixels."""
    font_size: int = 12
    """Font height in pixels (PIL's built-in font; needs Pillow with FreeType for sizes other than its own)."""
    density: float = 0.7
    """How much of the page is filled, in (0, 1]: 1 fills every line and column that fits."""
    kinds: tuple[str, ...] = KINDS
    """Which kinds of page to draw, chosen uniformly per record."""
    qa_per_image: int = 2
    """Question-answer turns per record (multi-turn conversation); fewer when a tiny page has fewer distinct questions."""
    cot: bool = False
    """Answer with a short rationale, then ``Answer: ...``."""

    def __post_init__(self):
        for name, low in (("n", 1), ("width", 64), ("height", 64), ("font_size", 6), ("qa_per_image", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r}: expected an int >= {low}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: expected an int")
        if not 0 < self.density <= 1:
            raise ValueError(f"density={self.density!r}: expected a fraction in (0, 1]")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"kinds={list(self.kinds)!r}: expected a non-empty subset of {list(KINDS)}")


@dataclass
class Page:
    """One rendered document: the image, the characters drawn on it, and its questions."""

    image: Image.Image
    kind: str
    chars: int
    qa: list[tuple[str, str, str]] = field(default_factory=list)  # (question, rationale, answer)


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font at ``size`` px (FreeType); the fixed bitmap font, with a warning, without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):
        warnings.warn(f"font_size={size} has no effect: this Pillow has no FreeType, so the fixed ~11 px bitmap "
                      "font is used", stacklevel=2)
        return ImageFont.load_default()


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


class _Canvas:
    def __init__(self, cfg: SynthConfig, font, mode: str = "RGB", background=(255, 255, 255)):
        # Text pages are grey-scale ("L"): a third of the PNG bytes; the data set converts to RGB.
        self.image = Image.new(mode, (cfg.width, cfg.height), background)
        self.draw = ImageDraw.Draw(self.image)
        self.font, self.cfg, self.chars = font, cfg, 0
        self.line = int(cfg.font_size * 1.3) + 1
        self.char = max(1.0, font.getlength("0123456789abcdefghij") / 20)
        self.margin = max(4, cfg.font_size // 2)

    def text(self, xy, s: str, fill=0) -> None:
        self.draw.text(xy, s, font=self.font, fill=fill)
        self.chars += len(s.replace(" ", ""))

    def width(self, s: str) -> float:
        return self.font.getlength(s)

    def rows(self, top: int = 0) -> int:
        usable = self.cfg.height - 2 * self.margin - top
        return max(1, int(self.cfg.density * usable / self.line))


def _ask(rng: random.Random, options: list[Callable[[], tuple[str, str, str]]], k: int) -> list[tuple[str, str, str]]:
    qa, seen = [], set()
    for _ in range(8 * k):
        q = rng.choice(options)()
        if q[0] not in seen:
            seen.add(q[0])
            qa.append(q)
        if len(qa) == k:
            break
    return qa


def draw_grid(rng: random.Random, cfg: SynthConfig, font) -> Page:
    c = _Canvas(cfg, font, mode="L", background=255)
    cell = c.char * 9 + c.margin
    cols = max(1, int(cfg.density * (cfg.width - 2 * c.margin) / cell))
    rows = c.rows()
    pool = _WORDS + [str(v) for v in rng.sample(range(100, 100000), max(1, rows * cols))]
    values = rng.sample(pool, rows * cols) if rows * cols <= len(pool) else [rng.choice(pool) for _ in range(rows * cols)]
    grid = [values[r * cols:(r + 1) * cols] for r in range(rows)]
    for r, row in enumerate(grid):
        for col, v in enumerate(row):
            c.text((c.margin + col * cell, c.margin + r * c.line), v)

    def cell_q():
        r, col = rng.randrange(rows), rng.randrange(cols)
        return (f"What is written in row {r + 1}, column {col + 1} of the grid?",
                f"Row {r + 1} from the top reads: {' '.join(grid[r][:col + 1])}{' ...' if col + 1 < cols else ''}; "
                f"the entry in column {col + 1} is {grid[r][col]}.", grid[r][col])

    def first_q():
        r = rng.randrange(rows)
        return (f"What is the first entry of row {r + 1}?", f"Row {r + 1} starts with {grid[r][0]}.", grid[r][0])

    return Page(c.image, "grid", c.chars, _ask(rng, [cell_q, first_q], cfg.qa_per_image))


def _item_names(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct item names: plain ones while they last, then two-word ones ("maple honey")."""
    if k <= len(_ITEMS):
        return rng.sample(_ITEMS, k)
    combos = [f"{w} {it}" for w in _WORDS for it in _ITEMS]
    return rng.sample(combos, min(k, len(combos)))


def draw_table(rng: random.Random, cfg: SynthConfig, font) -> Page:
    c = _Canvas(cfg, font, mode="L", background=255)
    offsets = [0, c.char * 18, c.char * 23, c.char * 31]  # Item, Qty, Price, Total
    block = c.char * 40
    blocks = max(1, int(cfg.density * (cfg.width - 2 * c.margin) / block))
    per_block = max(2, c.rows() - 1)
    items = _item_names(rng, blocks * per_block)
    qty = {it: rng.randint(1, 20) for it in items}
    price = {it: rng.randint(25, 5000) for it in items}
    total = {it: qty[it] * price[it] for it in items}
    for b in range(-(-len(items) // per_block)):
        x = c.margin + b * block
        for dx, h in zip(offsets, ("Item", "Qty", "Price", "Total")):
            c.text((x + dx, c.margin), h)
        c.draw.line((x, c.margin + c.line - 2, x + block - c.char * 2, c.margin + c.line - 2), fill=0)
        for k, it in enumerate(items[b * per_block:(b + 1) * per_block]):
            y = c.margin + (k + 1) * c.line + 2
            for dx, v in zip(offsets, (it, str(qty[it]), _money(price[it]), _money(total[it]))):
                c.text((x + dx, y), v)

    def price_q():
        it = rng.choice(items)
        return (f"What is the unit price of {it}?", f"The row for {it} lists a price of {_money(price[it])}.",
                _money(price[it]))

    def qty_q():
        it = rng.choice(items)
        return (f"How many {it} were ordered?", f"The Qty column in the {it} row says {qty[it]}.", str(qty[it]))

    def max_q():
        best = max(items, key=lambda it: (total[it], it))
        return ("Which item has the largest total?", f"Scanning the Total column, the largest is {_money(total[best])}, "
                f"in the {best} row.", best)

    return Page(c.image, "table", c.chars, _ask(rng, [price_q, qty_q, max_q], cfg.qa_per_image))


def draw_chart(rng: random.Random, cfg: SynthConfig, font) -> Page:
    c = _Canvas(cfg, font)
    n = max(2, min(len(_CATEGORIES), int(cfg.density * (cfg.width - 2 * c.margin) / (c.char * 6))))
    cats = rng.sample(_CATEGORIES, n)
    values = {cat: rng.randint(1, 99) for cat in cats}
    title = f"Units sold by {rng.choice(('region', 'team', 'quarter', 'store'))}"
    c.text((c.margin, c.margin), title)
    top, bottom = c.margin + 2 * c.line, cfg.height - c.margin - c.line
    slot = (cfg.width - 2 * c.margin) / n
    for k, cat in enumerate(cats):
        x0 = c.margin + k * slot + slot * 0.15
        x1 = c.margin + (k + 1) * slot - slot * 0.15
        y0 = bottom - (bottom - top - c.line) * values[cat] / 100
        c.draw.rectangle((x0, y0, x1, bottom), fill=_COLORS[k % len(_COLORS)])
        c.text((x0, y0 - c.line), str(values[cat]))
        c.text((x0, bottom + 2), cat)
    c.draw.line((c.margin, bottom, cfg.width - c.margin, bottom), fill=(0, 0, 0))

    def value_q():
        cat = rng.choice(cats)
        return (f"What is the value of the {cat} bar?", f"The label above the {cat} bar reads {values[cat]}.",
                str(values[cat]))

    def max_q():
        best = max(cats, key=lambda cat: (values[cat], cat))
        listing = ", ".join(f"{cat} {values[cat]}" for cat in cats)
        return ("Which bar is the highest?", f"The bars read {listing}; the highest is {best}.", best)

    def diff_q():
        a, b = rng.sample(cats, 2)
        return (f"What is {a} minus {b}?", f"{a} is {values[a]} and {b} is {values[b]}, so {values[a]} - {values[b]} = "
                f"{values[a] - values[b]}.", str(values[a] - values[b]))

    return Page(c.image, "chart", c.chars, _ask(rng, [value_q, max_q, diff_q], cfg.qa_per_image))


def draw_receipt(rng: random.Random, cfg: SynthConfig, font) -> Page:
    c = _Canvas(cfg, font, mode="L", background=248)
    shop = rng.choice(_SHOPS)
    date = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    items = _item_names(rng, max(1, c.rows() - 7))
    n = len(items)
    price = {it: rng.randint(30, 2500) for it in items}
    subtotal = sum(price.values())
    tax = subtotal * rng.choice((5, 7, 8, 10)) // 100
    right = min(cfg.width - c.margin, c.margin + c.char * 34)
    lines = [(shop, None), (f"Date {date}", None), ("-" * 24, None)] + [(it, _money(price[it])) for it in items] + \
        [("-" * 24, None), ("Subtotal", _money(subtotal)), ("Tax", _money(tax)), ("TOTAL", _money(subtotal + tax))]
    for k, (left, amount) in enumerate(lines):
        y = c.margin + k * c.line
        c.text((c.margin, y), left)
        if amount is not None:
            c.text((right - c.width(amount), y), amount)

    def total_q():
        return ("What is the total on the receipt?", f"Subtotal {_money(subtotal)} plus tax {_money(tax)} gives "
                f"{_money(subtotal + tax)}, the TOTAL line.", _money(subtotal + tax))

    def item_q():
        it = rng.choice(items)
        return (f"How much did the {it} cost?", f"The {it} line shows {_money(price[it])}.", _money(price[it]))

    def count_q():
        return ("How many items are on the receipt?", f"Counting the item lines between the dashed rules, from {items[0]} "
                f"to {items[-1]}, gives {n}.", str(n))

    def shop_q():
        return ("Which shop issued this receipt?", f"The header reads {shop}.", shop)

    return Page(c.image, "receipt", c.chars, _ask(rng, [total_q, item_q, count_q, shop_q], cfg.qa_per_image))


DRAW = {"grid": draw_grid, "table": draw_table, "chart": draw_chart, "receipt": draw_receipt}


def make_record(cfg: SynthConfig, index: int, font) -> tuple[Page, dict]:
    """Draw record ``index`` of a run; its randomness depends only on ``(cfg.seed, index)``."""
    rng = random.Random(f"fcot-synth/{cfg.seed}/{index}")
    kind = rng.choice(cfg.kinds)
    page = DRAW[kind](rng, cfg, font)
    conversations = []
    for k, (question, rationale, answer) in enumerate(page.qa):
        conversations.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + question})
        conversations.append({"from": "gpt", "value": f"{rationale}\nAnswer: {answer}" if cfg.cot else answer})
    tiles = num_tiles(cfg.width, cfg.height, max_tiles=12)  # at InternVL's training setting, thumbnail included
    record = {"id": f"synth-{cfg.seed}-{index:06d}", "image": f"images/{index:06d}.png", "conversations": conversations,
              "meta": {"kind": kind, "chars": page.chars, "tiles": tiles, "answers": [a for _, _, a in page.qa]}}
    return page, record


def synthesize(out: str | os.PathLike, cfg: SynthConfig, *, overwrite: bool = False, progress: bool = False) -> dict:
    """Write ``cfg.n`` records to ``out/data.jsonl`` and their PNGs to ``out/images``; return the summary.

    The run is written to a temporary folder next to ``out`` and renamed into place, so ``out``
    never holds half a run. An existing ``out`` is refused unless ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"out={str(out)!r} already exists: pass --overwrite (overwrite=True) to replace it")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    font = load_font(cfg.font_size)
    chars, tiles = 0, 0
    kinds: dict[str, int] = {}
    try:
        indices = range(cfg.n)
        if progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc="fcot data synth", unit="img")
        with open(tmp / "data.jsonl", "w", encoding="utf-8") as fh:
            for i in indices:
                page, record = make_record(cfg, i, font)
                page.image.save(tmp / record["image"], format="PNG", compress_level=1)
                fh.write(json.dumps(record, sort_keys=True) + "\n")
                chars += page.chars
                tiles += record["meta"]["tiles"]
                kinds[page.kind] = kinds.get(page.kind, 0) + 1
        summary = {"config": {**asdict(cfg), "kinds": list(cfg.kinds)}, "records": cfg.n, "kinds": dict(sorted(kinds.items())),
                   "chars_per_image": round(chars / cfg.n, 1), "tiles_per_image": round(tiles / cfg.n, 2),
                   "chars_per_visual_token": {str(t): round(chars / (tiles * t), 3) for t in (256, 128, 64)}}
        (tmp / "synth.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary
