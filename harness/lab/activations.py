"""Residual-stream activations at the decision token, and their on-disk layout.

Shared by the `extract_activations` stage (which writes a directory) and the stages that
read one (`train_probe`, steering). A directory holds:

    layer_{i:02d}.safetensors   tensor `activations`, [n_items, d_model] float32, for every
                                layer index i in 0..n_layers-1 (see LAYER_CONVENTION)
    metadata.jsonl              one row per item, in file order: id, text, category, labels
                                and, when the statement has one, group
    layer_convention.json       what each index is, the position read, the model and adapter

Layer indices: 0 is the embeddings' output (the residual stream entering block 0) and i
is the output of block i-1, all raw residual streams. Hugging Face's `hidden_states[-1]`
has the model's final norm applied (transformers 5.x ties it to `last_hidden_state`), so
the last index is taken from a forward hook on the last block instead: every index is on
the same, unnormalized scale.

The layer files are preallocated with a complete safetensors header and filled batch by
batch at their row offsets, so extraction holds one batch in memory whatever the number
of items. torch is imported lazily: stage kinds import this module at collection.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from harness.core.jsonl import jsonl_rows
from harness.core.stage import StageError

if TYPE_CHECKING:
    import torch

TENSOR = "activations"
METADATA_FILE = "metadata.jsonl"
CONVENTION_FILE = "layer_convention.json"
POSITION = "decision token: last non-pad input token"
LAST_INDEX_NOTE = (
    "every index is a raw residual stream; the last is the last block's output before the "
    "model's final norm (Hugging Face's hidden_states[-1] is after it and is not used)"
)
STATEMENT_FIELDS = ("id", "text", "category", "labels")
Progress = Callable[[int, int], None]  # (items done, items in all)


def layer_file(directory: Path, index: int) -> Path:
    return Path(directory) / f"layer_{index:02d}.safetensors"


def layer_name(index: int) -> str:
    return "embeddings" if index == 0 else f"block {index - 1} output"


# Every metric, plot and label names a layer by this index (a probe's best_layer, a lens's
# flip_layer, patching's rows, steering's layer): "layer i" is hidden_states[i].
LAYER_AXIS = "layer (0 = embeddings, i = output of block i-1)"


def layer_tick(index: int) -> str:
    """A layer's label on a plot axis: its index, the embeddings marked."""
    return "0 emb" if index == 0 else str(index)


# --- statements ----------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    id: str
    text: str
    category: str
    labels: dict[str, int] = field(default_factory=dict)  # label name -> 0 or 1
    # items of one group (e.g. a statement and its contrary) are never split between a
    # probe's training and test items, so a probe cannot score by recognizing the pair
    group: str | None = None


def load_statements(path: Path) -> list[Statement]:
    """Every row of a statements jsonl, or a StageError naming the file, the line and the fix."""
    path = Path(path)
    statements: list[Statement] = []
    seen: set[str] = set()
    for where, row in jsonl_rows(path, "statements file", "one statement"):
        statement = _statement(row, where)
        if statement.id in seen:
            raise StageError(f"{where}: duplicate id {statement.id!r}; ids must be unique")
        seen.add(statement.id)
        statements.append(statement)
    if not statements:
        raise StageError(f"{path}: no statements; expected one JSON object per line")
    return statements


def _is_key(value: object) -> bool:
    """A non-empty string or an integer (not a bool, which JSON would give as true/false)."""
    return isinstance(value, (str, int)) and not isinstance(value, bool) and str(value) != ""


def _statement(row: object, where: str) -> Statement:
    expected = f"a statement row has {', '.join(STATEMENT_FIELDS)}"
    if not isinstance(row, dict):
        raise StageError(f"{where}: expected a JSON object ({expected})")
    missing = [name for name in STATEMENT_FIELDS if name not in row]
    if missing:
        raise StageError(f"{where}: missing {', '.join(missing)} ({expected})")
    if not _is_key(row["id"]):
        raise StageError(f"{where}: id must be a non-empty string or an integer")
    for name in ("text", "category"):
        if not isinstance(row[name], str) or not row[name].strip():
            raise StageError(f"{where}: {name} must be non-empty text")
    labels = row["labels"]
    if not isinstance(labels, dict):
        raise StageError(f"{where}: labels must be an object of label name -> 0 or 1")
    for name, value in labels.items():
        # bool is an int in Python, and true/false in a labels file is a likely slip: refuse it
        if isinstance(value, bool) or value not in (0, 1) or not isinstance(value, int):
            raise StageError(
                f"{where}: label {name!r} is {json.dumps(value)}; labels must be the integers 0 or 1"
            )
    group = row.get("group")
    if group is not None and not _is_key(group):
        raise StageError(f"{where}: group must be a non-empty string or an integer (or left out)")
    return Statement(
        id=str(row["id"]),
        text=row["text"],
        category=row["category"],
        labels=dict(labels),
        group=None if group is None else str(group),
    )


def _metadata_row(statement: Statement) -> dict[str, Any]:
    row = {"id": statement.id, "text": statement.text, "category": statement.category}
    row["labels"] = statement.labels
    return row if statement.group is None else {**row, "group": statement.group}


# --- the layer files -----------------------------------------------------------------


def safetensors_header(
    shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The bytes before the data of a safetensors file of F32 tensors stored back to back in
    the order of `shapes`: the header's length (u64 little-endian), then its JSON (keys in
    that order, so the same tensors always give the same bytes), space-padded so the data
    starts on a multiple of 8 bytes."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {key: str(metadata[key]) for key in sorted(metadata)}
    start = 0
    for name, shape in shapes.items():
        end = start + math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [start, end]}
        start = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def save_f32(
    path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """A safetensors file of float32 tensors, names sorted, byte-identical for identical inputs
    (safetensors' own save_file orders its header differently from run to run, which would
    change a stage's output digest and rerun what depends on it)."""
    arrays = {name: np.ascontiguousarray(tensors[name], dtype="<f4") for name in sorted(tensors)}
    with open(path, "wb") as handle:
        handle.write(safetensors_header({name: a.shape for name, a in arrays.items()}, metadata))
        for array in arrays.values():
            handle.write(memoryview(array).cast("B"))


class LayerWriter:
    """Fills `layer_{i:02d}.safetensors` for every layer, one batch of rows at a time.

    The files are created complete (header, then zeros) and each `write` puts its rows at
    their offset through unbuffered file handles: nothing is kept between calls, so memory
    is one batch whatever the number of items. Rows come in order; `close` refuses files
    with rows never written, which would otherwise read as silent zeros.
    """

    def __init__(self, directory: Path, n_items: int, n_layers: int, d_model: int):
        self.directory = Path(directory)
        self.n_items, self.n_layers, self.d_model = n_items, n_layers, d_model
        self.rows_written = 0
        self.bytes_written = 0
        self._data_start: list[int] = []
        self._files: list[IO[bytes]] = []
        self.directory.mkdir(parents=True, exist_ok=True)
        for index in range(n_layers):
            metadata = {"layer": str(index), "name": layer_name(index)}
            header = safetensors_header({TENSOR: (n_items, d_model)}, metadata)
            handle = open(layer_file(self.directory, index), "w+b", buffering=0)
            handle.write(header)
            handle.truncate(len(header) + n_items * d_model * 4)  # sparse where the OS allows
            self._files.append(handle)
            self._data_start.append(len(header))

    def write(self, rows: np.ndarray) -> None:
        """The next rows of every layer: `rows` is [batch, n_layers, d_model]."""
        if rows.ndim != 3 or rows.shape[1:] != (self.n_layers, self.d_model):
            raise ValueError(f"rows must be [batch, {self.n_layers}, {self.d_model}], got {list(rows.shape)}")
        if self.rows_written + len(rows) > self.n_items:
            raise ValueError(f"more rows than the {self.n_items} items the files were made for")
        offset = self.rows_written * self.d_model * 4
        for index, handle in enumerate(self._files):
            block = np.ascontiguousarray(rows[:, index, :], dtype="<f4")
            handle.seek(self._data_start[index] + offset)
            handle.write(memoryview(block).cast("B"))
            self.bytes_written += block.nbytes
        self.rows_written += len(rows)

    def abort(self) -> None:
        """Close the files as they are (after an error: that error is the one to see)."""
        for handle in self._files:
            handle.close()
        self._files = []

    def close(self) -> None:
        self.abort()
        if self.rows_written != self.n_items:
            raise RuntimeError(f"only {self.rows_written} of {self.n_items} rows were written")

    def file_bytes(self) -> int:
        """Size of the layer files on disk (headers included)."""
        return sum(layer_file(self.directory, i).stat().st_size for i in range(self.n_layers))

    def __enter__(self) -> LayerWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --- readers -------------------------------------------------------------------------


def read_convention(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONVENTION_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise StageError(
            f"{directory} is not an activations directory: no readable {CONVENTION_FILE} "
            "(written by the extract_activations stage)"
        ) from None


def layer_count(directory: Path) -> int:
    return int(read_convention(directory)["n_layers"])


def read_layer(directory: Path, index: int) -> np.ndarray:
    """[n_items, d_model] float32 activations of layer `index`."""
    from safetensors.numpy import load_file

    path = layer_file(directory, index)
    if not path.is_file():
        raise StageError(f"{path} not found: layer {index} of an activations directory")
    return load_file(path)[TENSOR]


def read_metadata(directory: Path) -> list[dict[str, Any]]:
    path = Path(directory) / METADATA_FILE
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as error:
        raise StageError(f"{path}: cannot read the activations' item metadata ({error})") from None


# --- extraction ----------------------------------------------------------------------


def _last_block(model: Any, n_blocks: int) -> Any:
    """The model's last decoder block: the last module of the ModuleList named `layers` that
    holds `n_blocks` modules (LlamaModel.layers and its kin, also under a peft wrapper)."""
    import torch

    found = [
        module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList)
        and name.split(".")[-1] == "layers"
        and len(module) == n_blocks
    ]
    if len(found) != 1:
        raise StageError(
            f"cannot find the model's {n_blocks} decoder blocks (a ModuleList named `layers`); "
            "activation extraction supports Llama-style causal LMs"
        )
    return found[0][-1]


def decision_states(
    model: Any, tokenizer: Any, sequences: Sequence[Sequence[int]], batch_size: int
) -> Iterator[np.ndarray]:
    """For each batch of `sequences`, in order: [batch, n_blocks + 1, d_model] float32 residual
    streams at each row's decision token, every layer from one forward pass."""
    import torch

    from harness.lab.scoring import last_token_indices, right_pad

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    n_blocks = model.config.num_hidden_layers
    captured: dict[str, torch.Tensor] = {}

    def keep_output(_module: Any, _args: Any, output: Any) -> None:
        captured["last"] = output[0] if isinstance(output, tuple) else output

    hook = _last_block(model, n_blocks).register_forward_hook(keep_output)
    try:
        with torch.inference_mode():
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start : start + batch_size]
                input_ids, mask = right_pad(tokenizer, batch)
                last = last_token_indices(input_ids, mask, batch).to(device)
                hidden = model(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    output_hidden_states=True,
                    logits_to_keep=1,  # the head's output is not used: skip most of its work
                    use_cache=False,
                ).hidden_states
                if len(hidden) != n_blocks + 1:
                    raise RuntimeError(f"expected {n_blocks + 1} hidden states, got {len(hidden)}")
                layers = [*hidden[:-1], captured.pop("last")]  # the last one before the final norm
                rows = torch.arange(len(batch), device=device)
                yield torch.stack([h[rows, last] for h in layers], dim=1).float().cpu().numpy()
    finally:
        hook.remove()


@dataclass(frozen=True)
class Extracted:
    n_items: int
    n_layers: int
    d_model: int
    bytes_written: int  # the layer files' sizes, headers included


def write_activations(
    out_dir: Path,
    statements: Sequence[Statement],
    batches: Iterable[np.ndarray],
    model_name: str,
    adapter: Path | None = None,
    progress: Progress | None = None,
) -> Extracted:
    """An activations directory from `batches` ([batch, n_layers, d_model] rows of the
    statements, in order), consumed one at a time."""
    from harness.core.store import relative_path, write_json, write_jsonl

    out_dir = Path(out_dir)
    writer: LayerWriter | None = None
    try:
        for rows in batches:
            if writer is None:  # the shapes are known from the first batch
                writer = LayerWriter(out_dir, len(statements), rows.shape[1], rows.shape[2])
            writer.write(rows)
            if progress:
                progress(writer.rows_written, len(statements))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        raise StageError("no statements to extract activations of")
    writer.close()

    write_jsonl(
        out_dir / METADATA_FILE,
        (_metadata_row(s) for s in statements),
    )
    convention = {
        "n_layers": writer.n_layers,
        "layers": [{"index": i, "name": layer_name(i)} for i in range(writer.n_layers)],
        "position": POSITION,
        "residual": LAST_INDEX_NOTE,
        "d_model": writer.d_model,
        "n_items": writer.n_items,
        "dtype": "float32",
        "model": model_name,
        "adapter": relative_path(adapter, out_dir) if adapter is not None else None,
    }
    write_json(out_dir / CONVENTION_FILE, convention)
    return Extracted(writer.n_items, writer.n_layers, writer.d_model, writer.file_bytes())


def extract_to_dir(
    model: Any,
    tokenizer: Any,
    statements: Sequence[Statement],
    out_dir: Path,
    batch_size: int,
    model_name: str,
    adapter: Path | None = None,
    progress: Progress | None = None,
) -> Extracted:
    """Run `statements` through `model` and write their activations directory."""
    from harness.lab.scoring import encode

    sequences = [encode(tokenizer, s.text) for s in statements]
    for statement, ids in zip(statements, sequences, strict=True):
        if not ids:
            raise StageError(f"statement {statement.id!r} encodes to no tokens")
    batches = decision_states(model, tokenizer, sequences, batch_size)
    return write_activations(out_dir, statements, batches, model_name, adapter, progress)


def megabytes(n_bytes: int) -> float:
    """Bytes as MB (10^6 bytes), rounded to the kB."""
    return math.floor(n_bytes / 1e3 + 0.5) / 1e3
