"""Cross-batch memory (XBM): Wang, Zhang, Huang & Scott, "Cross-Batch Memory for Embedding Learning",
CVPR 2020, arXiv:1912.06798.

Embeddings drift slowly late in training, so the embeddings of earlier batches are still useful
negatives: a memory of thousands of them gives a pair loss (:class:`isc.losses.contrastive.ContrastiveLoss`)
far more negatives than one batch holds, for the cost of a matmul. The descriptor-track 1st place (Yokoo
2021, arXiv:2112.04323) trained with a 20k memory.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from isc.losses.contrastive import ContrastiveLoss
from isc.losses.pairwise import full_precision
from isc.train.dist import NoBroadcastState, all_gather_no_grad

__all__ = ["CrossBatchMemory"]


class CrossBatchMemory(NoBroadcastState):
    """A FIFO memory of past embeddings around a :class:`ContrastiveLoss`, as in the descriptor-track 1st place.

    forward(embeddings (B, D), labels (B,)) -> the loss dict of the current batch against batch ∪ memory,
    plus ``"memory_fill"`` (fraction of the memory in use); then, in training mode only (so validation
    does not pollute it), the batch is enqueued detached.

    The memory is a fixed-size ring of ``memory_size`` rows (``memory_embeddings`` (K, D),
    ``memory_labels`` (K,)). ``embedding_dim=None`` infers D from the first batch (or from a checkpoint), so
    one config works after any head, or none.

    DDP: the memory is filled with the *all-gathered* batch (W*B rows per step, in rank order), so every rank
    holds the same memory with every rank's embeddings, whatever the loss's ``gather_distributed``. It is no
    registered buffer (:class:`isc.train.dist.NoBroadcastState`): DDP would broadcast K x D floats from rank 0
    before every forward. It still follows ``.to()`` and is saved in the ``state_dict`` under
    ``memory_embeddings``, ``memory_labels``, ``ptr``, ``num_filled``, so a resumed run keeps it.
    """

    inputs: ClassVar[str] = "labelled_embeddings"
    """What forward takes: descriptors and their class labels (P x K batches of copies)."""
    needs_classifier: ClassVar[bool] = False

    no_broadcast = ("memory_embeddings", "memory_labels")

    def __init__(
        self, embedding_dim: int | None = None, memory_size: int = 20000, loss: ContrastiveLoss | None = None
    ) -> None:
        super().__init__()
        if memory_size < 1:
            raise ValueError(f"memory_size must be positive, got {memory_size}")
        if embedding_dim is not None and embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive or null (inferred), got {embedding_dim}")
        self.loss = loss if loss is not None else ContrastiveLoss()
        self.embedding_dim = embedding_dim
        self.memory_size = memory_size
        self.memory_embeddings: torch.Tensor | None = None
        self.memory_labels: torch.Tensor | None = None
        self.ptr = 0  # next row to overwrite
        self.num_filled = 0
        if embedding_dim is not None:
            self._allocate(embedding_dim, torch.device("cpu"), torch.get_default_dtype())

    def _allocate(self, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.embedding_dim = dim
        self.memory_embeddings = torch.zeros(self.memory_size, dim, device=device, dtype=dtype)
        self.memory_labels = torch.zeros(self.memory_size, dtype=torch.long, device=device)
        self.ptr, self.num_filled = 0, 0

    def _memory_for(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring, allocated on first use (D and device from ``embeddings``, at least float32) and kept on
        the data's device (a checkpoint restored on the CPU follows the model at its first step)."""
        if self.memory_embeddings is None or self.memory_labels is None:
            self._allocate(embeddings.shape[1], embeddings.device, full_precision(embeddings).dtype)
        assert self.memory_embeddings is not None and self.memory_labels is not None
        if self.memory_embeddings.device != embeddings.device:
            self.memory_embeddings = self.memory_embeddings.to(embeddings.device)
            self.memory_labels = self.memory_labels.to(embeddings.device)
        return self.memory_embeddings, self.memory_labels

    def get_memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (n, D) embeddings and (n,) labels, oldest first."""
        if self.memory_embeddings is None or self.memory_labels is None:
            return torch.zeros(0, self.embedding_dim or 0), torch.zeros(0, dtype=torch.long)
        n = self.num_filled
        if n < self.memory_size:
            return self.memory_embeddings[:n], self.memory_labels[:n]
        order = torch.roll(torch.arange(n, device=self.memory_labels.device), -self.ptr)
        return self.memory_embeddings[order], self.memory_labels[order]

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Write (B, D), (B,) into the ring as given (no gathering), overwriting the oldest rows (only the
        last ``memory_size`` if B is larger)."""
        memory, memory_labels = self._memory_for(embeddings)
        embeddings, labels = embeddings.detach()[-self.memory_size :], labels.detach()[-self.memory_size :]
        n = embeddings.shape[0]
        idx = (self.ptr + torch.arange(n, device=memory_labels.device)) % self.memory_size
        memory[idx] = embeddings.to(memory)
        memory_labels[idx] = labels.to(memory_labels)
        self.ptr = (self.ptr + n) % self.memory_size
        self.num_filled = min(self.num_filled + n, self.memory_size)

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the memory (e.g. when the embedding space changes abruptly)."""
        if self.memory_embeddings is not None and self.memory_labels is not None:
            self.memory_embeddings.zero_()
            self.memory_labels.zero_()
        self.ptr, self.num_filled = 0, 0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if embeddings.ndim != 2 or (
            self.embedding_dim is not None and embeddings.shape[1] != self.embedding_dim
        ):
            raise ValueError(f"expected embeddings (B, {self.embedding_dim}), got {tuple(embeddings.shape)}")
        memory, memory_labels = self._memory_for(embeddings)
        n = self.num_filled
        out = self.loss(embeddings, labels, memory[:n], memory_labels[:n])
        out["memory_fill"] = embeddings.new_tensor(n / self.memory_size)
        if self.training:  # the global batch (identity without torch.distributed): same memory on every rank
            self.enqueue(all_gather_no_grad(embeddings), all_gather_no_grad(labels))
        return out

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "ptr"] = torch.tensor(self.ptr, dtype=torch.long)
        destination[prefix + "num_filled"] = torch.tensor(self.num_filled, dtype=torch.long)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        counters = {name: state_dict.get(prefix + name) for name in ("ptr", "num_filled")}
        rest = {k: v for k, v in state_dict.items() if k not in (prefix + "ptr", prefix + "num_filled")}
        n_errors = len(error_msgs)
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        memory = self.memory_embeddings
        if memory is not None and (memory.ndim != 2 or memory.shape[0] != self.memory_size):
            error_msgs.append(
                f"{prefix}memory_embeddings: expected {self.memory_size} rows, got {tuple(memory.shape)}"
            )
        for name, value in counters.items():
            if value is None and strict:
                missing_keys.append(prefix + name)
        ptr, num_filled = counters["ptr"], counters["num_filled"]
        if len(error_msgs) > n_errors or ptr is None or num_filled is None or memory is None:
            return
        self.embedding_dim = memory.shape[1]
        self.ptr, self.num_filled = int(ptr), int(num_filled)

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, memory_size={self.memory_size}"
