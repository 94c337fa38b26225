"""InternVL conversation records -> model inputs: parsing, tiling, label masking, bad-record counting.

A record is one JSON object per line, InternVL's chat format::

    {"image": "doc.png" | ["a.png", "b.png"],            # optional; relative to image_root
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the total?"},
                       {"from": "gpt", "value": "42.50"},
                       {"from": "human", "value": "And the tax?"}, {"from": "gpt", "value": "3.10"}]}

Roles alternate ``human``/``gpt`` (``user``/``assistant`` are accepted), starting with
``human`` after an optional leading ``system`` turn, ending with ``gpt``. Each ``<image>`` in
a human turn is one image, in order; a single image without a placeholder gets ``<image>\\n``
prepended to the first human turn (as InternVL does). Extra keys are kept out of the inputs.

Each image is tiled (:mod:`fcot.data.tiling`); its placeholder becomes ``<img>`` +
``tokens_per_tile x tiles`` context tokens + ``</img>``. ``tokens_per_tile`` is 256 for the
uncompressed model and 128 or 64 once a compressor keeps 50 % or 25 % of them. With several
images, each gets ``max(1, max_tiles // images)`` tiles at most (InternVL's rule).

Labels are -100 everywhere except the answer turns: their text and the template's end-of-turn
token, so the model learns to stop.

Bad records never stop an epoch. When the data set is built, every line is parsed and checked
(JSON, schema, placeholders, image files present with a readable header and no more pixels than
the cap of :mod:`fcot.data.images`, length); failures are
counted by reason and left out. An image that fails to decode later (its pixels corrupt) is
counted when met and the next good record takes its place. :meth:`ConversationDataset.summary`
gives the counts for the trainer to log; a data set with no usable record raises
:class:`NoUsableRecordsError` when it is built, before any training.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from fcot.data.images import ImageError, check_image, load_image, max_pixels_setting
from fcot.data.tiling import HFTiler, InternVLChatTiler, Tiler, internvl_image_processor  # noqa: F401 (re-exported)

logger = logging.getLogger("fcot.data")

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format as text pieces around each turn's content.

    ``user`` wraps a human turn and opens the assistant's reply; ``assistant`` wraps the answer
    and is supervised in full (it ends with the end-of-turn token); ``assistant_tail`` follows it
    unsupervised; ``system`` wraps the system message (left out when there is none).
    """

    system: str
    user: str
    assistant: str
    assistant_tail: str = ""


TEMPLATES: dict[str, ChatTemplate] = {
    # InternVL2-1B/2B/8B/26B (Hermes-2, internlm2-chat), InternVL2.5/3 (Qwen2.5): ChatML.
    "chatml": ChatTemplate(system="<|im_start|>system\n{content}<|im_end|>\n",
                           user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
                           assistant="{content}<|im_end|>", assistant_tail="\n"),
    # InternVL2-4B (Phi-3-mini): phi3-chat.
    "phi3": ChatTemplate(system="<|system|>\n{content}<|end|>\n", user="<|user|>\n{content}<|end|>\n<|assistant|>\n",
                         assistant="{content}<|end|>", assistant_tail="\n"),
}


class NoUsableRecordsError(ValueError):
    """Raised when a data set holds no record that can be trained on."""


def count_skip(skipped: Counter, examples: dict[str, list[str]], reason: str, example: str, keep: int = 3) -> None:
    """Count one record skipped for ``reason``, keeping its first ``keep`` examples (the training
    set's :class:`SkipSummary` and fcot eval's skip counts share it)."""
    skipped[reason] += 1
    shown = examples.setdefault(reason, [])
    if len(shown) < keep:
        shown.append(example)


@dataclass
class SkipSummary:
    """Which records were left out, and why: counts by reason and a few examples of each."""

    source: str
    lines: int
    usable: int
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "lines": self.lines, "usable": self.usable,
                "skipped": dict(sorted(self.skipped.items())), "examples": self.examples}

    def __str__(self) -> str:
        head = f"{self.source}: {self.usable} usable of {self.lines} records"
        if not self.skipped:
            return head + ", none skipped"
        parts = [f"{reason}={n} (e.g. {self.examples.get(reason, ['?'])[0]})" for reason, n in sorted(self.skipped.items())]
        return head + f", {sum(self.skipped.values())} skipped: " + "; ".join(parts)


class BadRecord(Exception):
    """A record that cannot be used; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class _Record:
    where: str  # "file.jsonl:line", for messages
    turns: list[tuple[str, str]]  # (role, text); roles "system" (first only), "human", "gpt"
    images: list[Path]
    tiles: list[int] | None = None  # per image, when known from the header scan


def parse_record(obj: Any, where: str, image_root: Path | None) -> _Record:
    """Check one decoded JSON line against the schema; raise :class:`BadRecord` naming the problem."""
    if not isinstance(obj, dict):
        raise BadRecord("not_an_object", f"{where}: a JSON {type(obj).__name__}, expected an object")
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise BadRecord("bad_conversations", f"{where}: 'conversations' must be a non-empty list")
    turns: list[tuple[str, str]] = []
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in _ROLES:
            raise BadRecord("bad_conversations", f"{where}: turn {k} must be {{'from': one of {sorted(_ROLES)}, 'value': str}}")
        turns.append((_ROLES[turn["from"]], turn["value"]))
    body = turns[1:] if turns[0][0] == "system" else turns
    if not body or any(role != ("human", "gpt")[k % 2] for k, (role, _) in enumerate(body)) or len(body) % 2:
        raise BadRecord("bad_conversations", f"{where}: roles must alternate human, gpt, ... and end with gpt "
                        f"(got {[r for r, _ in turns]})")
    if any(IMAGE_PLACEHOLDER in text for role, text in turns if role != "human"):
        raise BadRecord("placeholder_mismatch", f"{where}: {IMAGE_PLACEHOLDER} outside a human turn")

    raw = obj.get("image")
    if raw is None:
        paths: list[str] = []
    elif isinstance(raw, str):
        paths = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
        paths = raw
    else:
        raise BadRecord("bad_image_field", f"{where}: 'image' must be a path or a non-empty list of paths, got {raw!r}")
    n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns if role == "human")
    if len(paths) == 1 and n_placeholders == 0:
        k = 1 if turns[0][0] == "system" else 0
        turns[k] = ("human", f"{IMAGE_PLACEHOLDER}\n{turns[k][1]}")
    elif n_placeholders != len(paths):
        raise BadRecord("placeholder_mismatch", f"{where}: {n_placeholders} {IMAGE_PLACEHOLDER} placeholders for "
                        f"{len(paths)} images")
    images = [Path(p) if image_root is None or os.path.isabs(p) else image_root / p for p in paths]
    return _Record(where=where, turns=turns, images=images)


def _token_id(tokenizer, token: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    tid = ids[0] if ids else None
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
        raise ValueError(f"tokenizer has no {token!r} token: add it (tokenizer.add_special_tokens) or use the "
                         "model's own tokenizer, which has InternVL's image tokens")
    return int(tid)


class ConversationTokenizer:
    """Turns a parsed record + tile counts into ``input_ids`` and ``labels`` (answers only).

    Each text piece is tokenized on its own (no special tokens added) and the pieces are
    concatenated, so the answer spans are known exactly; image blocks are inserted as ids.
    """

    def __init__(self, tokenizer, *, tokens_per_tile: int = 256, template: str | ChatTemplate = "chatml",
                 system_message: str | None = None, add_bos: bool | None = None):
        if not isinstance(tokens_per_tile, int) or isinstance(tokens_per_tile, bool) or tokens_per_tile < 1:
            raise ValueError(f"tokens_per_tile={tokens_per_tile!r}: expected a positive int (256 uncompressed, "
                             "128 at ratio 0.5, 64 at ratio 0.75)")
        if isinstance(template, str):
            if template not in TEMPLATES:
                raise ValueError(f"template={template!r}: expected one of {sorted(TEMPLATES)} or a ChatTemplate")
            template = TEMPLATES[template]
        self.tokenizer, self.tokens_per_tile, self.template = tokenizer, tokens_per_tile, template
        self.system_message = system_message
        self.img_start, self.img_end, self.img_context = (_token_id(tokenizer, t) for t in (IMG_START, IMG_END, IMG_CONTEXT))
        if add_bos is None:
            add_bos = tokenizer.bos_token_id is not None
        if add_bos and tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token")
        self.prefix = [int(tokenizer.bos_token_id)] if add_bos else []

    def _text(self, text: str, tiles: list[int], supervised: bool, ids: list[int], labels: list[int]) -> None:
        pieces = text.split(IMAGE_PLACEHOLDER)
        for k, piece in enumerate(pieces):
            if piece:
                tok = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += tok
                labels += tok if supervised else [IGNORE_INDEX] * len(tok)
            if k < len(pieces) - 1:
                block = [self.img_start] + [self.img_context] * (self.tokens_per_tile * tiles.pop(0)) + [self.img_end]
                ids += block
                labels += [IGNORE_INDEX] * len(block)

    def __call__(self, turns: Sequence[tuple[str, str]], tiles: Sequence[int]) -> tuple[list[int], list[int]]:
        tiles = list(tiles)
        ids, labels = list(self.prefix), [IGNORE_INDEX] * len(self.prefix)
        t = self.template
        system = turns[0][1] if turns and turns[0][0] == "system" else self.system_message
        if system:
            self._text(t.system.format(content=system), tiles, False, ids, labels)
        for role, text in turns:
            if role == "human":
                self._text(t.user.format(content=text), tiles, False, ids, labels)
            elif role == "gpt":
                self._text(t.assistant.format(content=text), tiles, True, ids, labels)
                if t.assistant_tail:
                    self._text(t.assistant_tail, tiles, False, ids, labels)
        return ids, labels


class ConversationDataset(torch.utils.data.Dataset):
    """A map-style data set of InternVL conversation records for HF ``Trainer``.

    Items are dicts: ``input_ids`` and ``labels`` (LongTensor ``(L,)``), ``pixel_values``
    (``(tiles, 3, S, S)`` float32, all images' tiles in order; ``(0, 3, S, S)`` for a text-only
    record) and ``num_tiles`` (int). Batch them with :class:`ConversationCollator`.

    Args:
        jsonl: a JSONL file of records (or several, read in order).
        tokenizer: a transformers tokenizer with the ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` tokens.
        tiler: :class:`~fcot.data.tiling.HFTiler` (transformers-native family) or
            :class:`~fcot.data.tiling.InternVLChatTiler` (remote-code family); default HFTiler().
        image_root: folder relative image paths are resolved against (default: the JSONL's folder).
        max_tiles: the most grid tiles per image (thumbnail excluded), 12 in InternVL's training.
        tokens_per_tile: visual tokens per tile the model takes: 256, or 128 / 64 when compressed.
        max_length: records longer than this many tokens are skipped (``too_long``); None keeps all.
        template, system_message, add_bos: see :class:`ConversationTokenizer`.
        scan_images: read each image's header when building, so missing/unreadable images and
            over-long records are counted up front (a header read, not a decode).
        skip_log_dir: where decode failures met later are also appended (one JSONL per process),
            so :meth:`summary` counts those met in DataLoader workers and other ranks too.
        max_pixels: the cap on an image's decoded pixels (:mod:`fcot.data.images`); a record with
            a larger image is skipped (``image_too_large``). None: ``FCOT_MAX_IMAGE_PIXELS`` or
            40 Mpx; 0: no cap.
    """

    def __init__(self, jsonl: str | os.PathLike | Sequence[str | os.PathLike], tokenizer, tiler: Tiler | None = None, *,
                 image_root: str | os.PathLike | None = None, max_tiles: int = 12, tokens_per_tile: int = 256,
                 max_length: int | None = None, template: str | ChatTemplate = "chatml",
                 system_message: str | None = None, add_bos: bool | None = None, scan_images: bool = True,
                 skip_log_dir: str | os.PathLike | None = None, max_pixels: int | None = None):
        files = [Path(jsonl)] if isinstance(jsonl, (str, os.PathLike)) else [Path(p) for p in jsonl]
        if not files:
            raise ValueError("jsonl=[]: expected at least one JSONL file")
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"jsonl={str(f)!r}: no such file")
        if not isinstance(max_tiles, int) or isinstance(max_tiles, bool) or max_tiles < 1:
            raise ValueError(f"max_tiles={max_tiles!r}: expected an int >= 1 (12 in InternVL's training)")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length={max_length!r}: expected a positive int or None")
        self.tiler = tiler if tiler is not None else HFTiler()
        self.encoder = ConversationTokenizer(tokenizer, tokens_per_tile=tokens_per_tile, template=template,
                                             system_message=system_message, add_bos=add_bos)
        self.max_tiles, self.max_length = max_tiles, max_length
        self.max_pixels = max_pixels_setting(max_pixels) or 0  # resolved once: workers see the same cap
        self.skip_log_dir = Path(skip_log_dir) if skip_log_dir is not None else None
        root = Path(image_root) if image_root is not None else None
        self._summary = SkipSummary(source=", ".join(str(f) for f in files), lines=0, usable=0)
        self._runtime_bad: dict[int, tuple[str, str]] = {}  # index -> (reason, detail)
        self.records: list[_Record] = []
        for f in files:
            with open(f, "rb") as fh:  # bytes: one badly encoded line is one bad record, not a crash
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    self._summary.lines += 1
                    try:
                        where = f"{f.name}:{n}"
                        rec = parse_record(self._decode(line, where), where, root if root is not None else f.parent)
                        if scan_images or not rec.images:
                            self._scan(rec)
                        self.records.append(rec)
                    except BadRecord as e:
                        self._count(e.reason, e.detail)
        self._summary.usable = len(self.records)
        if not self.records:
            raise NoUsableRecordsError(f"no usable record: {self._summary}")
        if self._summary.skipped:
            logger.warning("data set built: %s", self._summary)

    @staticmethod
    def _decode(line: bytes, where: str) -> Any:
        try:
            return json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRecord("invalid_json", f"{where}: {e}") from None

    def _count(self, reason: str, example: str) -> None:
        count_skip(self._summary.skipped, self._summary.examples, reason, example)

    def _per_image_max(self, n_images: int) -> int:
        return max(1, self.max_tiles // max(1, n_images))

    def _scan(self, rec: _Record) -> None:
        tiles = []
        for path in rec.images:
            if not path.is_file():
                raise BadRecord("missing_image", f"{rec.where}: {path} does not exist")
            try:
                width, height = check_image(path, max_pixels=self.max_pixels)  # reads the header only
            except ImageError as e:
                raise BadRecord("unreadable_image" if e.reason == "corrupt_image" else e.reason, f"{rec.where}: {e}") from None
            tiles.append(self.tiler.num_tiles(width, height, self._per_image_max(len(rec.images))))
        rec.tiles = tiles
        ids, labels = self.encoder(rec.turns, tiles)
        self._check_encoded(rec, ids, labels)

    def _check_encoded(self, rec: _Record, ids: list[int], labels: list[int]) -> None:
        if self.max_length is not None and len(ids) > self.max_length:
            raise BadRecord("too_long", f"{rec.where}: {len(ids)} tokens > max_length={self.max_length}")
        if all(label == IGNORE_INDEX for label in labels):
            raise BadRecord("no_answer_tokens", f"{rec.where}: the answers tokenize to nothing")

    def __len__(self) -> int:
        return len(self.records)

    def _build(self, rec: _Record) -> dict[str, Any]:
        pixels = []
        for path in rec.images:
            if not path.is_file():
                raise BadRecord("missing_image", f"{rec.where}: {path} does not exist")
            try:
                im = load_image(path, max_pixels=self.max_pixels, mode=None)
            except ImageError as e:  # a decode error (truncated or corrupt pixel data), or over the cap
                raise BadRecord(e.reason, f"{rec.where}: {e}") from None
            with im:
                pixels.append(self.tiler(im, self._per_image_max(len(rec.images))))
        tiles = [p.shape[0] for p in pixels]
        ids, labels = self.encoder(rec.turns, tiles)
        self._check_encoded(rec, ids, labels)
        s = self.tiler.tile_size
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
                "pixel_values": torch.cat(pixels) if pixels else torch.zeros(0, 3, s, s), "num_tiles": sum(tiles)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.records)
        for k in range(n):
            i = (index + k) % n
            if i in self._runtime_bad:
                continue
            try:
                return self._build(self.records[i])
            except BadRecord as e:
                self._runtime_bad[i] = (e.reason, e.detail)
                self._log_runtime_skip(e)
                logger.warning("skipped a bad record (the next one takes its place): %s", e)
        raise NoUsableRecordsError(f"every record failed to load: {self.summary()}")

    def _log_runtime_skip(self, e: BadRecord) -> None:
        if self.skip_log_dir is None:
            return
        self.skip_log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.skip_log_dir / f"data-skips.{os.getpid()}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"reason": e.reason, "detail": e.detail}) + "\n")

    def summary(self) -> SkipSummary:
        """Counts of skipped records by reason: those found when building, plus decode failures met since.

        With ``skip_log_dir``, decode failures are read from every process's log there (workers,
        ranks), each record once; otherwise only this process's are known.
        """
        runtime = {detail: reason for reason, detail in self._runtime_bad.values()}
        if self.skip_log_dir is not None and self.skip_log_dir.is_dir():
            for log in sorted(self.skip_log_dir.glob("data-skips.*.jsonl")):
                for line in log.read_text(encoding="utf-8").splitlines():
                    entry = json.loads(line)
                    runtime[entry["detail"]] = entry["reason"]
        s = SkipSummary(self._summary.source, self._summary.lines, self._summary.usable - len(runtime),
                        Counter(self._summary.skipped), {k: list(v) for k, v in self._summary.examples.items()})
        for detail, reason in runtime.items():
            count_skip(s.skipped, s.examples, reason, detail)
        return s


@dataclass
class ConversationCollator:
    """Pads a list of :class:`ConversationDataset` items into a batch (right padding).

    Returns ``input_ids``, ``attention_mask``, ``labels`` (padding is -100) of shape ``(B, L)``,
    ``pixel_values`` ``(total tiles, 3, S, S)`` (the samples' tiles concatenated in order;
    absent when the batch has no image) and ``num_tiles`` ``(B,)``, which says which tiles
    belong to which sample. ``num_tiles`` is bookkeeping, not a model input: a trainer pops it
    (OpenGVLab's ``InternVLChatModel.forward`` wants ``image_flags`` = ones(total tiles) instead).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if not isinstance(self.pad_token_id, int) or isinstance(self.pad_token_id, bool):
            raise TypeError(f"pad_token_id={self.pad_token_id!r}: expected an int (tokenizer.pad_token_id)")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={self.pad_to_multiple_of!r}: expected a positive int or None")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("features=[]: expected at least one item")
        length = max(f["input_ids"].numel() for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for b, f in enumerate(features):
            n = f["input_ids"].numel()
            input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = f["input_ids"], f["labels"], 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
               "num_tiles": torch.tensor([int(f["num_tiles"]) for f in features], dtype=torch.long)}
        pixels = [f["pixel_values"] for f in features if f["pixel_values"].shape[0]]
        if pixels:
            out["pixel_values"] = torch.cat(pixels)
        return out
