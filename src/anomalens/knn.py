"""Exact nearest-neighbour search over a bank of vectors (L2 distance).

PatchCore and AnomalyDINO score inside their scoring module
(:class:`~anomalens.detectors.scoring.PatchCoreScorer`: one matrix product and a minimum, the same
graph in Python and ONNX); their leave-one-out calibration masks a training image's own patches in
:func:`pairwise_sq_dists`. :class:`NearestNeighbours` serves the other searches (support sets of the
re-weighted score, the video detector's memories), with two interchangeable backends, same results:

* ``"torch"``: ``||q||^2 - 2 q.m + ||m||^2`` by chunked matrix products, minimum over the bank.
* ``"faiss"``: ``faiss.IndexFlatL2`` (Johnson et al., "Billion-scale similarity search with GPUs", 2019).
"""

from __future__ import annotations

import torch

from .errors import ConfigError

BACKENDS = ("torch", "faiss")


def pairwise_sq_dists(q: torch.Tensor, m: torch.Tensor, m_sq: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Squared L2 distances ``(Q, M)`` between rows of ``q`` ``(Q, D)`` and ``m`` ``(M, D)``, clamped at 0;
    written into ``out`` ``float32`` ``(Q, M)`` when given (a buffer reused across calls)."""
    if m_sq is None:
        m_sq = (m * m).sum(1)
    d = torch.addmm(m_sq[None, :], q, m.T, alpha=-2.0, out=out)
    d.add_((q * q).sum(1, keepdim=True))
    return d.clamp_(min=0.0)


class NearestNeighbours:
    """k-nearest-neighbour search in a fixed bank of vectors.

    Args:
        bank: ``float32`` ``(M, D)``.
        backend: ``"torch"`` or ``"faiss"``.
        max_chunk_elems: the torch backend processes queries in chunks whose distance matrix has at
            most this many elements (default 16M = 64 MB).

    Raises:
        ConfigError: unknown backend, or faiss not installed.
    """

    def __init__(self, bank: torch.Tensor, backend: str = "torch", max_chunk_elems: int = 1 << 24):
        if backend not in BACKENDS:
            raise ConfigError(f"unknown nearest-neighbour backend {backend!r}; choose one of {BACKENDS}")
        self.bank = bank.float().contiguous()
        self.backend = backend
        self.max_chunk_elems = int(max_chunk_elems)
        self.bank_sq = (self.bank * self.bank).sum(1)
        self._index = None
        if backend == "faiss":
            try:
                import faiss
            except ImportError as exc:  # pragma: no cover
                raise ConfigError("the faiss backend needs faiss-cpu: pip install faiss-cpu") from exc
            self._index = faiss.IndexFlatL2(self.bank.shape[1])
            self._index.add(self.bank.numpy())

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest bank rows of each query.

        Args:
            queries: ``float32`` ``(Q, D)``.
            k: neighbours per query, ``1 <= k <= M``.

        Returns:
            ``(distances, indices)``: ``float32`` ``(Q, k)`` L2 distances (not squared), ascending, and
            ``int64`` ``(Q, k)`` bank row indices.
        """
        queries = queries.float().contiguous()
        if self._index is not None:
            d, i = self._index.search(queries.numpy(), k)
            return torch.from_numpy(d).clamp_(min=0).sqrt_(), torch.from_numpy(i).long()
        m = self.bank.shape[0]
        chunk = max(1, self.max_chunk_elems // max(1, m))
        ds, idx = [], []
        for s in range(0, queries.shape[0], chunk):
            d = pairwise_sq_dists(queries[s : s + chunk], self.bank, self.bank_sq)
            if k == 1:
                v, i = d.min(1, keepdim=True)
            else:
                v, i = torch.topk(d, k, dim=1, largest=False)
            ds.append(v)
            idx.append(i)
        return torch.cat(ds).sqrt_(), torch.cat(idx)
