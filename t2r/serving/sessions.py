"""Conversations kept as states: a session's next turn sends only its new text.

After a response, the state after the prompt and every generated token is kept under the
session's name (in memory, least recently used evicted past a byte budget, and with a folder in
one safetensors file per session, written atomically, so sessions survive a restart). The state
has a fixed size: a session's file is as large after ten thousand tokens as after ten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from t2r.modeling.saved import write_atomically
from t2r.ops.state import HybridAttentionState, KVCacheState, LinearAttentionState, ModelState

FORMAT = 1
_LAYER_TYPES = {cls.__name__: cls for cls in (HybridAttentionState, KVCacheState, LinearAttentionState)}


@dataclass
class Session:
    """state: one row; kind: "chat" or "completion" (a chat turn continues the chat template);
    tokens: how many tokens the state has seen."""

    state: ModelState
    kind: str
    tokens: int


def state_tensors(state: ModelState) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A ModelState as flat named tensors ("3.linear.kv", ...) and its layers' type names."""
    tensors: dict[str, torch.Tensor] = {"seen": state.seen}
    kinds = []
    for index, layer in enumerate(state.layers):
        kinds.append(type(layer).__name__)
        for field in dataclasses.fields(layer):
            value = getattr(layer, field.name)
            if isinstance(value, LinearAttentionState):
                tensors[f"{index}.{field.name}.kv"] = value.kv
                tensors[f"{index}.{field.name}.k_sum"] = value.k_sum
            else:
                tensors[f"{index}.{field.name}"] = value
    return {name: t.contiguous() for name, t in tensors.items()}, kinds


def state_from_tensors(tensors: dict[str, torch.Tensor], kinds: list[str]) -> ModelState:
    layers = []
    for index, kind in enumerate(kinds):
        cls = _LAYER_TYPES[kind]
        values = {}
        for field in dataclasses.fields(cls):
            if field.name == "linear":
                values["linear"] = LinearAttentionState(tensors[f"{index}.linear.kv"], tensors[f"{index}.linear.k_sum"])
            elif f"{index}.{field.name}" in tensors:
                values[field.name] = tensors[f"{index}.{field.name}"]
            else:  # a session saved before the global cache existed: it has none
                values[field.name] = _no_cache(tensors, index, field.name)
        layers.append(cls(**values))
    return ModelState(tuple(layers), tensors["seen"])


def _no_cache(tensors: dict[str, torch.Tensor], index: int, name: str) -> torch.Tensor:
    """An empty global cache tensor `name` shaped like layer `index`'s state (N = 0)."""
    if name == "global_valid":
        return tensors[f"{index}.valid"][:, :0]
    if name == "global_features":
        return tensors[f"{index}.linear.k_sum"][:, :, None, :][:, :, :0]
    return tensors[f"{index}.keys"][:, :, :0]


class SessionStore:
    """name -> Session; `folder` (optional) keeps every session on disk too."""

    def __init__(
        self, max_bytes: int, folder: Path | None = None, model_id: str = "", max_disk_bytes: int | None = None
    ) -> None:
        """max_disk_bytes: the session files' total bound in `folder` (None: none); past it the
        least recently written files go, oldest first (`evicted_files` counts them)."""
        self.max_bytes, self.folder, self.model_id = max_bytes, folder, model_id
        self.max_disk_bytes, self.evicted_files, self.disk_bytes = max_disk_bytes, 0, 0
        self._writes: dict[Path, int] = {}  # file -> when this process last wrote it (a counter)
        self._clock = 0
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self.bytes = 0
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.safetensors"

    def claim(self, name: str) -> bool:
        """Mark a session as in use by one request; False if another request holds it."""
        with self._lock:
            if name in self._busy:
                return False
            self._busy.add(name)
            return True

    def release(self, name: str) -> None:
        with self._lock:
            self._busy.discard(name)

    def get(self, name: str, device: torch.device | str = "cpu") -> Session | None:
        with self._lock:
            session = self._sessions.get(name)
            if session is not None:
                self._sessions.move_to_end(name)
                return session
        if self.folder is None or not self.path(name).is_file():
            return None
        session = self._read(name, device)
        self._remember(name, session)
        return session

    def put(self, name: str, session: Session) -> None:
        self._remember(name, session)
        if self.folder is not None:
            self._write(name, session)

    def _remember(self, name: str, session: Session) -> None:
        with self._lock:
            old = self._sessions.pop(name, None)
            if old is not None:
                self.bytes -= old.state.nbytes()
            self._sessions[name] = session
            self.bytes += session.state.nbytes()
            while self.bytes > self.max_bytes and len(self._sessions) > 1:
                _, evicted = self._sessions.popitem(last=False)  # still on disk when there is a folder
                self.bytes -= evicted.state.nbytes()

    def _write(self, name: str, session: Session) -> None:
        tensors, kinds = state_tensors(session.state)
        metadata = {
            "format": str(FORMAT), "name": name, "kind": session.kind, "tokens": str(session.tokens),
            "layers": json.dumps(kinds), "model": self.model_id,
        }  # fmt: skip
        payload = safetensors.torch.save({k: v.cpu() for k, v in tensors.items()}, metadata=metadata)
        # 0600: a conversation's state is its owner's (and the umask is never touched to get there)
        write_atomically(self.path(name), lambda temporary: temporary.write_bytes(payload), private=True)
        self._bound_disk(keep=self.path(name))

    def _bound_disk(self, keep: Path) -> None:
        """Remove the least recently written session files until the folder is within its bound
        (never `keep`, the file just written)."""
        assert self.folder is not None
        with self._lock:
            self._clock += 1
            self._writes[keep] = self._clock
            # Files of earlier processes first (by time written), then this one's in the order it wrote
            # them: a counter, as two writes can share a file-system timestamp.
            order = lambda path: (self._writes.get(path, 0), path.stat().st_mtime_ns)  # noqa: E731
            files = sorted(self.folder.glob("*.safetensors"), key=order)
            total = sum(path.stat().st_size for path in files)
            if self.max_disk_bytes is not None:
                for path in files:
                    if total <= self.max_disk_bytes:
                        break
                    if path != keep:
                        total -= path.stat().st_size
                        path.unlink(missing_ok=True)
                        self._writes.pop(path, None)
                        self.evicted_files += 1
            self.disk_bytes = total

    def _read(self, name: str, device: torch.device | str) -> Session:
        path = self.path(name)
        with safetensors.safe_open(str(path), framework="pt", device=str(device)) as file:
            metadata = file.metadata() or {}
            if metadata.get("format") != str(FORMAT) or metadata.get("model") != self.model_id:
                raise ValueError(f"session file {path} was written for another model or t2r version")
            tensors = {key: file.get_tensor(key) for key in file.keys()}
        state = state_from_tensors(tensors, json.loads(metadata["layers"]))
        return Session(state, metadata["kind"], int(metadata["tokens"]))
