"""HashTable: a dynamic embedding table keyed by arbitrary int64 ids.

A table grows when it meets a new id in training mode. Its rows are not
``nn.Parameter``s: ``model.parameters()`` yields dense parameters only, and the
table's gradient is kept as values (row, gradient) in a ``GradientBuffer`` for a
sparse optimizer of ``recis.optim``. ``filter_out_sparse_param(model)`` finds the
tables of a model.

Storage is a ``recis.store.RowStore`` (``table.store``): ids, rows, the optimizer
slots and per-row metadata. A ``recis.nn.row_lifecycle.RowLifecycle`` decides which
ids get rows and which rows go (admission, capacity eviction, filters) and counts it
(``table.stats()``). The table adds the differentiable lookup, the initializer of new
rows, input checks and the module's state dict.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from recis.nn.functional import GradReceiver, row_lookup
from recis.nn.gradient_buffer import GradientBuffer
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.initializers import Initializer, default_initializer
from recis.nn.row_lifecycle import RowLifecycle
from recis.nn.slicing import DEFAULT_SLICE, Slice, gen_slice
from recis.nn.sparse_state_dict import note_table_state, split_sparse_dense_state_dict
from recis.nn.table_children import TableChildren
from recis.nn.tables_with_filters import register_filtered_table
from recis.ops import gather_rows
from recis.ops.row_pieces import RowsOrPieces, row_count
from recis.store import RowStore

LookupUnion = Callable[[torch.Tensor, "AdmitHook | None", "Exception | None"], torch.Tensor]
RowRemovalHook = Callable[[torch.Tensor], None]

GRAD_REDUCTIONS = ("worker", "worker_sum", "id")

_SLOT_PREFIX = "slots."
_COLUMN_PREFIX = "meta."
_LIFECYCLE_PREFIX = "lifecycle."
_PENDING_IDS = "pending_grad.ids"
_PENDING_VALUES = "pending_grad.values"


def _check_recis_options(block_size: int, slice: Slice, grad_reduce_by: str) -> None:  # noqa: A002
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"HashTable block_size must be a positive int, got {block_size!r}")
    if not isinstance(slice, Slice):
        raise TypeError(f"HashTable slice must be a recis.nn.slicing.Slice, got {type(slice).__name__}")
    if grad_reduce_by not in GRAD_REDUCTIONS:
        raise ValueError(f"HashTable grad_reduce_by must be one of {list(GRAD_REDUCTIONS)}, got {grad_reduce_by!r}")


def _check_device(device: torch.device, what: str) -> None:
    """Refuse the meta device: the id map finds rows by the ids' values, which meta tensors lack."""
    if device.type == "meta":
        raise ValueError(f"{what} cannot live on the meta device: its id map needs the values of its ids")


def _normalize_shape(embedding_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (embedding_shape,) if isinstance(embedding_shape, int) else tuple(embedding_shape)
    if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"embedding_shape must be a positive int or a list of positive ints, got {embedding_shape!r}")
    return shape


class HashTable(nn.Module):
    """An embedding table indexed by any int64 id.

    Args (RecIS's, in its positional order):
        embedding_shape: shape of one row, an int or a list such as ``[64]``.
        block_size: RecIS allocates rows in blocks of this many; accepted (a positive
            int) with no effect here: rows grow by doubling.
        dtype: dtype of the rows (float32, bfloat16, float16 or float64).
        device: device of the rows and of the ids it accepts.
        coalesced, children: the features sharing this table (``recis.nn.table_children``);
            a coalesced table keeps each child's ids apart.
        slice: RecIS's key-space partition (``recis.nn.slicing``); validated, no effect.
        initializer: maps new ids to their first rows (see ``recis.nn.initializers``);
            by default uniform in +-1/sqrt(embedding_dim), deterministic in (seed, id).
            (RecIS's default is zeros.)
        name: a label used in error messages and checkpoints.
        grad_reduce_by: how an id's gradient is reduced, as in RecIS: ``"worker"`` (the
            sum over its occurrences; over several ranks, the mean over workers),
            ``"worker_sum"`` (the sum, also over workers), ``"id"`` (the mean over its
            occurrences in each lookup, summed over lookups and workers).
        filter_hook: a ``FilterHook`` run by ``recis.hooks.filter_hook.HashTableFilterHook``.

    Keyword-only (recis):
        seed: seed of the initializer.
        capacity: at most this many rows; a full table evicts by ``eviction`` to make
            room for new ids (never a row of the current lookup nor one with a gradient
            pending) and raises ``ValueError``, changing nothing, when it cannot.
        eviction: ``"lru"`` (default with a capacity) or ``"lfu"``; see ``recis.nn.eviction``.
        admit_hook: the ``AdmitHook`` of every lookup that passes none.
        requires_optimizer_state: RecIS's; False makes the table frozen: its lookups carry
            no gradient to it and sparse optimizers leave it out (as RecIS's do).

    ``table(ids)`` returns ``ids.shape + embedding_shape``. In training mode absent ids
    are inserted (as the admit hook allows); in eval mode nothing is inserted and absent
    ids read as their initial value. With an admit hook (``table(ids, admit_hook=...)``),
    ids without a row read zeros and get no update. The result is differentiable:
    backward hands the gradient of each unique id to the table (see ``pending_grad``), for
    a ``recis.optim`` sparse optimizer.
    """

    def __init__(
        self,
        embedding_shape: int | Sequence[int],
        block_size: int = 5,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        coalesced: bool = False,
        children: Sequence[str] | None = None,
        slice: Slice = DEFAULT_SLICE,  # noqa: A002 (RecIS's name)
        initializer: Initializer | None = None,
        name: str | None = None,
        grad_reduce_by: str = "worker",
        filter_hook: FilterHook | None = None,
        *,
        seed: int = 0,
        capacity: int | None = None,
        eviction: str | None = None,
        admit_hook: AdmitHook | None = None,
        requires_optimizer_state: bool = True,
    ) -> None:
        super().__init__()
        _check_recis_options(block_size, slice, grad_reduce_by)
        if not isinstance(requires_optimizer_state, bool):
            raise TypeError(f"HashTable requires_optimizer_state must be a bool, got {requires_optimizer_state!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"HashTable dtype must be a floating dtype, got {dtype}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"HashTable seed must be an int, got {seed!r}")
        if not -(2**63) <= seed < 2**63:
            raise ValueError(f"HashTable seed must be in [-2**63, 2**63), got {seed}")
        self._embedding_shape = _normalize_shape(embedding_shape)
        self._initializer = initializer if initializer is not None else default_initializer(self._embedding_shape)
        if hasattr(self._initializer, "set_shape"):  # RecIS's builder calls: Xavier/Kaiming fans see the block
            self._initializer.set_shape([block_size, *self._embedding_shape])
            self._initializer.set_dtype(dtype)
            self._initializer.build()
        self.name = name
        self.seed = seed
        self.block_size = block_size
        self.slice = slice
        self.grad_reduce_by = grad_reduce_by
        self._requires_optimizer_state = requires_optimizer_state
        self.children_info = TableChildren(children, coalesced, name)
        device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as tensors report it
        _check_device(device, "HashTable")
        self._lifecycle = RowLifecycle(
            device, capacity=capacity, eviction=eviction, admit_hook=admit_hook, filter_hook=filter_hook
        )
        self._store = RowStore(self.embedding_dim, dtype, device)
        self._lifecycle.prepare(self._store)
        self._lifecycle.removal_listener = self._rows_removed
        self._row_removal_hooks: OrderedDict[int, RowRemovalHook] = OrderedDict()
        self._lookup_union: LookupUnion | None = None
        self._grad = GradientBuffer()
        # A leaf requiring grad that every differentiable lookup hangs from.
        self._grad_anchor = torch.empty(0, device=device, requires_grad=True)
        if filter_hook is not None:
            register_filtered_table(self)

    # ------------------------------------------------------------------ properties
    @property
    def store(self) -> RowStore:
        """The table's storage: ids, rows and optimizer slots."""
        return self._store

    @property
    def lifecycle(self) -> RowLifecycle:
        """Admission, eviction and filter policies of the table, with their counters."""
        return self._lifecycle

    @property
    def requires_optimizer_state(self) -> bool:
        """False for a frozen table (RecIS's name): its lookups carry no gradient to it, sparse
        optimizers leave it out, and ``accept_grad`` refuses; it still inserts, admits and evicts."""
        return self._requires_optimizer_state

    @property
    def capacity(self) -> int | None:
        return self._lifecycle.capacity

    def stats(self) -> dict[str, int | None]:
        """Cheap counters: ``rows``, ``capacity``, ``inserted``, ``evicted`` (``evicted_capacity``
        + ``evicted_filter``), ``not_admitted``, ``lookups`` and ``hits`` (``recis.nn.row_lifecycle``).
        For a sharded table: this rank's rows and the lookups it served."""
        return self._lifecycle.stats(len(self))

    @property
    def embedding_shape(self) -> tuple[int, ...]:
        return self._embedding_shape

    @property
    def embedding_dim(self) -> int:
        """Elements per row: the product of ``embedding_shape``."""
        return math.prod(self._embedding_shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._store.dtype

    @property
    def device(self) -> torch.device:
        return self._store.device

    def initializer(self) -> Initializer:
        """The initializer of new rows (a method, as in RecIS)."""
        return self._initializer

    @property
    def weight(self) -> torch.Tensor:
        """All rows, ``(len(self), embedding_dim)``, in the order of ``ids()``; a view."""
        return self._store.weight

    def __len__(self) -> int:
        return len(self._store)

    def ids(self, child: str | None = None) -> torch.Tensor:
        """The ids present (of ``child`` only, as stored: encoded in a coalesced table), in row order."""
        ids = self.local_ids()
        return ids if child is None else ids[self.children_info.holds(ids, child)]

    def ids_map(self, child: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, rows)``: the ids present (of ``child``) and their rows in ``weight`` (RecIS's name)."""
        ids = self.local_ids()
        rows = torch.arange(ids.numel(), device=self.device)
        if child is None:
            return ids, rows
        held = self.children_info.holds(ids, child)
        return ids[held], rows[held]

    def embeddings(self, child: str | None = None) -> torch.Tensor:
        """The rows present (of ``child``), in the order of ``ids(child)``; a copy (RecIS's name)."""
        _, rows = self.ids_map(child)
        return self.weight.index_select(0, rows).reshape(-1, *self._embedding_shape)

    def encode_ids(self, ids: torch.Tensor, child: str) -> torch.Tensor:
        """The ids under which ``child``'s ``ids`` are stored (``recis.nn.table_children``)."""
        return self.children_info.encode(self.checked_ids(ids), child)

    @property
    def coalesce(self) -> bool:
        return self.children_info.coalesced

    @property
    def children_hashtable(self) -> list[str]:
        return list(self.children_info.names)

    def local_ids(self) -> torch.Tensor:
        """The ids stored in this process, in row order (for a sharded table: the local shard)."""
        return self._store.ids()

    def ids_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The ids stored in local ``rows``; costs O(len(rows)), not O(len(self))."""
        return self._store.ids_of(rows)

    def extra_repr(self) -> str:
        label = f"name={self.name!r}, " if self.name else ""
        return f"{label}embedding_shape={list(self._embedding_shape)}, dtype={self.dtype}, rows={len(self)}"

    def describe(self) -> str:
        """A short label for error messages."""
        return f"HashTable {self.name!r}" if self.name else f"HashTable(embedding_shape={list(self._embedding_shape)})"

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        """Follow ``model.to(device)``, ``.cuda()``, ``.double()``, ``.half()``: move the table,
        and cast its rows (optimizer slots keep their dtype). All or nothing; the meta device
        is refused (``ValueError``), as at construction."""
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        _check_device(probe.device, self.describe())
        dtype = probe.dtype if probe.dtype.is_floating_point else self.dtype
        if probe.device != self.device or dtype != self.dtype:
            store = self._store.moved(probe.device, dtype)
            anchor = torch.empty(0, device=probe.device, requires_grad=True)
            self._grad.to(probe.device)
            self._lifecycle.moved(probe.device)
            self._store, self._grad_anchor = store, anchor
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ reading
    def forward(self, ids: torch.Tensor, admit_hook: AdmitHook | None = None) -> torch.Tensor:
        flat, admit_hook = self._checked_lookup(ids, admit_hook)
        unique_ids, inverse = torch.unique(flat, return_inverse=True)
        rows, unique_values, protected = self._unique_rows(unique_ids, admit_hook)
        may_miss = self.may_miss(admit_hook)
        store = self._store
        receive = partial(
            self._accept_unique_grad, rows, protected, unique_ids, store.generation, store.replacements, may_miss
        )
        return self.differentiable(unique_values, inverse, receive).reshape(*ids.shape, *self._embedding_shape)

    def may_miss(self, admit_hook: AdmitHook | None) -> bool:
        """Whether a lookup (with this per-call admit hook) may leave ids without a row: in eval
        mode, or when an admit hook decides. Such ids read zeros or their initial value and
        receive no gradient."""
        return not self.training or admit_hook is not None or self._lifecycle.admit_hook is not None

    def _checked_lookup(self, ids: torch.Tensor, admit_hook: AdmitHook | None) -> tuple[torch.Tensor, AdmitHook | None]:
        """Flat ids and the admit hook, or a clear error; a shared lookup's error reaches every rank."""
        try:
            return self.checked_ids(ids).reshape(-1), self._checked_admit_hook(admit_hook)
        except (TypeError, ValueError) as bad_input:
            if self._shares_lookup(admit_hook):
                no_ids = torch.empty(0, dtype=torch.int64, device=self.device)
                self._lookup_union(no_ids, None, bad_input)  # raises here, PeerError on the other ranks
            raise

    def share_lookups(self, union: LookupUnion | None) -> None:
        """Make the training lookups of this replica that decide which ids hold rows (a capacity,
        a filter or an admit hook) collective; ``recis.dist.ShardedOptimizer`` does, for replicated tables.

        Such a lookup inserts, admits, evicts and counts ``union(unique_ids, admit_hook, error)``:
        every rank's distinct ids, sorted. Every replica then makes the same decisions and stays
        identical, as one process would with the concatenated batch. ``None``: local lookups again.
        """
        self._lookup_union = union

    def _shares_lookup(self, admit_hook: object) -> bool:
        decides_rows = bool(self._lifecycle.columns) or self._lifecycle.admit_hook is not None or admit_hook is not None
        return self._lookup_union is not None and self.training and decides_rows

    def unique_rows(self, unique_ids: torch.Tensor, admit_hook: AdmitHook | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (-1: none) and values of distinct ids for a lookup: in training mode, absent ids are
        inserted as the lifecycle admits them; ids without a row read zeros under an admit hook,
        else (eval mode) their initial value."""
        rows, values, _ = self._unique_rows(unique_ids, admit_hook)
        return rows, values

    def _unique_rows(
        self, unique_ids: torch.Tensor, admit_hook: AdmitHook | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``unique_rows``, and the rows a gradient of this lookup protects from eviction (those of
        every rank's ids when the lookup is shared)."""
        hooked = admit_hook is not None or self._lifecycle.admit_hook is not None
        protected = None
        if self.training:
            rows, protected = self._training_rows(unique_ids, admit_hook)
            if not hooked:
                return rows, self._store.gather(rows), protected
        else:
            rows = self._store.find(unique_ids)
            if not hooked:
                return rows, self._read_or_initial(unique_ids, rows), rows
        values = torch.zeros((rows.numel(), self.embedding_dim), dtype=self.dtype, device=self.device)
        present = rows >= 0
        values[present] = self._store.gather(rows[present])
        return rows, values, rows if protected is None else protected

    def _training_rows(
        self, unique_ids: torch.Tensor, admit_hook: AdmitHook | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of a training lookup's distinct ids, and the rows the lifecycle looked up. A lookup
        that will bring a gradient (grad enabled, a table that is not frozen) protects its rows
        until the window ends; a frozen table's never do, as no gradient or optimizer ends it."""
        shared = self._shares_lookup(admit_hook)
        looked_up = self._lookup_union(unique_ids, admit_hook, None) if shared else unique_ids
        protect = torch.is_grad_enabled() and self._requires_optimizer_state
        looked_up_rows = self._lifecycle.lookup_rows(
            self._store, looked_up, self.initial_values, admit_hook, protect=protect
        )
        if not shared:
            return looked_up_rows, looked_up_rows
        return looked_up_rows.index_select(0, torch.searchsorted(looked_up, unique_ids)), looked_up_rows

    def _checked_admit_hook(self, admit_hook: AdmitHook | None) -> AdmitHook | None:
        if admit_hook is not None and not isinstance(admit_hook, AdmitHook):
            raise TypeError(f"{self.describe()}: admit_hook must be an AdmitHook, got {type(admit_hook).__name__}")
        return admit_hook

    def differentiable(self, unique_values: RowsOrPieces, inverse: torch.Tensor, receive: GradReceiver) -> torch.Tensor:
        """``unique_values[inverse]`` (the unique rows may come in pieces, ``recis.ops.row_pieces``); with
        grad enabled, backward hands the per-unique gradient to ``receive`` (summed over an id's
        occurrences; their mean with ``grad_reduce_by="id"``). A frozen table's rows are constants to autograd."""
        if torch.is_grad_enabled() and self._requires_optimizer_state:
            if self.grad_reduce_by == "id":
                receive = partial(_mean_over_occurrences, receive, inverse, row_count(unique_values))
            return row_lookup(self._grad_anchor, unique_values, inverse, receive)
        return gather_rows(unique_values, inverse)

    def _accept_unique_grad(
        self,
        rows: torch.Tensor,
        protected: torch.Tensor,
        unique_ids: torch.Tensor,
        generation: int,
        replacements: int,
        may_miss: bool,
        grad: torch.Tensor,
    ) -> None:
        if generation != self._store.generation:
            raise RuntimeError(
                f"{self.describe()} was reloaded between forward and backward (or filtered): its rows were "
                "renumbered, so this gradient cannot be applied"
            )
        if may_miss:  # ids without a row (eval mode, not admitted) receive no gradient; no host sync otherwise
            present = rows >= 0
            rows, grad, unique_ids = rows[present], grad[present], unique_ids[present]
            protected = protected[protected >= 0]
        if replacements != self._store.replacements and not torch.equal(self._store.ids_of(rows), unique_ids):
            raise RuntimeError(
                f"{self.describe()}: rows of this lookup were evicted for new ids before its backward; "
                "run backward before the next lookup, or raise the capacity"
            )
        self._lifecycle.protect(self._store, protected)
        self._grad.add(rows, grad, distinct=True)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ids that are present, ``ids.shape + embedding_shape``; no insert, no grad.

        Raises ``KeyError`` naming the first absent id.
        """
        ids = self.checked_ids(ids)
        rows = self._rows_of_present(ids.reshape(-1))
        return self._store.gather(rows).reshape(*ids.shape, *self._embedding_shape)

    @torch.no_grad()
    def peek(self, unique_ids: torch.Tensor) -> torch.Tensor:
        """Rows of 1-D ids, ``(len(ids), embedding_dim)``; absent ids read as their initial value. No insert."""
        return self._read_or_initial(unique_ids, self._store.find(unique_ids))

    def initial_values(self, ids: torch.Tensor) -> torch.Tensor:
        """The first value a new row for each id gets, ``(len(ids), embedding_dim)`` in the table dtype."""
        values = torch.as_tensor(self._initializer(ids, self._embedding_shape, self.seed))
        expected = (ids.numel(), *self._embedding_shape)
        if tuple(values.shape) != expected and tuple(values.shape) != (ids.numel(), self.embedding_dim):
            raise ValueError(
                f"{self.describe()}: initializer returned shape {tuple(values.shape)}, expected {expected}"
            )
        return values.reshape(ids.numel(), self.embedding_dim).to(device=self.device, dtype=self.dtype)

    def rows_for(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of 1-D ids (repeats allowed), inserting absent ones with their initial values and zero slots
        (evicting as a lookup would in a table with a capacity).

        One probe of the id map per id; only the absent ids are deduplicated.
        """
        return self._find_or_insert(ids)[0]

    def _find_or_insert(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows_for(ids)``, and which ids were absent before."""
        rows = self._store.find(ids)
        absent = rows < 0
        if bool(absent.any()):
            new_ids, inverse = torch.unique(ids[absent], return_inverse=True)
            rows[absent] = self._insert(new_ids, self.initial_values(new_ids), rows[~absent]).index_select(0, inverse)
        return rows, absent

    def _insert(self, new_ids: torch.Tensor, values: torch.Tensor, keep_rows: torch.Tensor) -> torch.Tensor:
        """Rows for distinct absent ids, within the capacity (evicting, but never ``keep_rows``)."""
        if self._lifecycle.capacity is None:
            return self._store.insert(new_ids, values)
        return self._lifecycle.insert(self._store, new_ids, values, keep_rows)

    def rows_to_update(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of 1-D ids a gradient arrived for, and which ids have one: all (absent ones
        inserted) in an unbounded table; only present ones when admission or eviction
        decides which ids hold rows (a gradient never brings an id in past them)."""
        if self._lifecycle.columns or self._lifecycle.admit_hook is not None:
            rows = self._store.find(ids)
            return rows, rows >= 0
        return self.rows_for(ids), torch.ones(ids.numel(), dtype=torch.bool, device=ids.device)

    # ------------------------------------------------------------------ writing
    @torch.no_grad()
    def assign(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Insert or overwrite rows. Slots of new rows start at zero; nothing is differentiated.

        With repeated ids, the last value given for an id wins.
        """
        self.assign_rows(*self.checked_assignment(ids, values))

    def checked_assignment(self, ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat ids and ``(len(ids), embedding_dim)`` values in the table's dtype, or a clear error."""
        ids = self.checked_ids(ids)
        expected = (*ids.shape, *self._embedding_shape)
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
            raise TypeError(f"{self.describe()}.assign: values must be a floating tensor, got {got}")
        if tuple(values.shape) not in (expected, (ids.numel(), self.embedding_dim)):
            raise ValueError(f"{self.describe()}.assign: values have shape {tuple(values.shape)}, expected {expected}")
        ids = ids.reshape(-1)
        return ids, values.reshape(ids.numel(), self.embedding_dim).to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def assign_rows(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """``assign`` of checked flat ids and ``(len(ids), embedding_dim)`` values; the last value of an id wins."""
        unique_ids, inverse = torch.unique(ids, return_inverse=True)
        last_position = torch.full_like(unique_ids, -1).scatter_reduce_(
            0, inverse, torch.arange(ids.numel(), device=self.device), reduce="amax"
        )
        self.write_rows(unique_ids, values.index_select(0, last_position), {})

    @torch.no_grad()
    def write_rows(
        self,
        unique_ids: torch.Tensor,
        weight: torch.Tensor | None,
        slots: dict[str, torch.Tensor],
        columns: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Insert or overwrite rows of distinct ids: their values (if given), the given registered
        slots and the given metadata columns the lifecycle keeps (``column_names()``)."""
        if weight is not None:
            weight = weight.to(device=self.device, dtype=self.dtype)
        rows = self._store.find(unique_ids)
        absent = rows < 0
        if bool(absent.any()):
            new_ids = unique_ids[absent]
            values = self.initial_values(new_ids) if weight is None else weight[absent]
            rows[absent] = self._insert(new_ids, values, rows[~absent])
        self._store.scatter(rows, weight, slots)
        for name, values in (columns or {}).items():
            if self._store.has_column(name):
                self._store.column(name)[rows] = values.to(device=self.device, dtype=torch.int64).reshape(-1)

    def reserve(self, row_count: int) -> None:
        """Make room for ``row_count`` rows (and their slots) at once, instead of growing by doubling."""
        self._store.reserve(row_count)

    @torch.no_grad()
    def insert(self, ids: torch.Tensor, embeddings: torch.Tensor) -> None:
        """RecIS's name of ``assign``: insert or overwrite the rows of ``ids``."""
        self.assign(ids, embeddings)

    def clear(self, child: str | None = None) -> None:
        """Remove every row (of ``child`` only, if given) and, for the whole table, any
        pending gradient (slot registrations stay)."""
        if child is not None:
            self.remove(self.ids(child))
            return
        removed = self._store.ids().clone() if self._row_removal_hooks else None
        self._store.clear()
        self.clear_grad()
        if removed is not None:
            self._rows_removed(removed)

    @torch.no_grad()
    def remove(self, ids: torch.Tensor) -> int:
        """Remove the present ids among 1-D ``ids`` with their rows, slots and metadata (a pending
        gradient of other rows follows them); absent ids are ignored. Returns how many were removed."""
        ids = self.checked_ids(ids).reshape(-1)
        present = ids[self._store.find(ids) >= 0]
        moved_from, moved_to = self._store.remove(present)
        self._renumber_pending(moved_from, moved_to)
        self._rows_removed(present)
        return torch.unique(present).numel()

    def register_row_removal_hook(self, hook: RowRemovalHook) -> RemovableHandle:
        """Call ``hook(ids)`` with the ids whose rows the table gave up: evicted for new ids, filtered,
        removed or cleared. Returns a handle whose ``remove()`` unregisters it (``torch.nn.Module``'s
        hook convention)."""
        handle = RemovableHandle(self._row_removal_hooks)
        self._row_removal_hooks[handle.id] = hook
        return handle

    def _rows_removed(self, ids: torch.Tensor) -> None:
        if ids.numel():
            for hook in self._row_removal_hooks.values():
                hook(ids)

    def reset(self) -> None:
        """RecIS's reset: ``clear()``, which here also gives the memory back."""
        self.clear()

    # ------------------------------------------------------------------ filters
    @torch.no_grad()
    def run_filter(self) -> int:
        """Remove the rows the filter hook finds stale (none with a gradient pending); returns how many.

        Local: a sharded table's rank filters the rows it owns.
        """
        stale = self._lifecycle.stale_ids(self._store)
        if stale.numel() == 0:
            return 0
        removed = self.remove(stale)
        self._lifecycle.count_filtered(removed)
        return removed

    def advance_filter_step(self, steps: int = 1) -> None:
        """Advance the filter's global step (``HashTableFilterHook.after_step`` does, once per step)."""
        self._lifecycle.advance_step(steps)

    def _renumber_pending(self, moved_from: torch.Tensor, moved_to: torch.Tensor) -> None:
        self._grad.renumber(moved_from, moved_to)

    # ------------------------------------------------------------------ optimizer slots
    def check_slot(self, name: str, width: int, dtype: torch.dtype) -> None:
        """Raise unless ``add_slot(name, width, dtype)`` would succeed; changes nothing."""
        problem = self._store.check_slot(name, width, dtype)
        if problem:
            raise ValueError(f"{self.describe()}: {problem}")

    def add_slot(self, name: str, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Register a per-row optimizer slot of ``width`` elements (zeros), or return the existing one."""
        self.check_slot(name, width, dtype)
        self._store.add_slot(name, width, dtype)
        return self.slot(name)

    def slot(self, name: str) -> torch.Tensor:
        """The slot ``name`` of every row, ``(len(self), width)``; a view."""
        if not self._store.has_slot(name):
            raise KeyError(f"{self.describe()} has no slot {name!r}; it has {self.slot_names()}")
        return self._store.slot(name)

    def drop_slots(self) -> None:
        """Forget every optimizer slot (for a replica whose slots are kept elsewhere)."""
        self._store.drop_slots()

    def slot_names(self) -> list[str]:
        return self._store.slot_names()

    # ------------------------------------------------------------------ metadata columns
    def column_names(self) -> list[str]:
        """The per-row metadata columns the lifecycle keeps (``recis.nn.row_lifecycle``)."""
        return self._store.column_names()

    def column(self, name: str) -> torch.Tensor:
        """The metadata column ``name`` of every row, int64 ``(len(self),)``; a view."""
        if not self._store.has_column(name):
            raise KeyError(f"{self.describe()} has no metadata column {name!r}; it has {self.column_names()}")
        return self._store.column(name)

    # ------------------------------------------------------------------ gradients
    def accept_grad(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """Add ``grad`` (``ids.shape + embedding_shape``) to the pending gradient of present ids."""
        flat_ids, grad = self.checked_gradient(ids, grad)
        if self._lookup_union is not None and self._lifecycle.columns:
            raise RuntimeError(
                f"{self.describe()}: accept_grad is not available on a bounded replica under ShardedOptimizer "
                "(its rows would be protected from eviction on this rank only); use a ShardedHashTable"
            )
        rows = self._rows_of_present(flat_ids)
        self._lifecycle.protect(self._store, rows)
        self._grad.add(rows, grad, distinct=False)

    def checked_gradient(self, ids: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat int64 ids and ``(len(ids), embedding_dim)`` gradient rows, or a clear error
        (``RuntimeError`` for a frozen table, which takes no gradient)."""
        ids = self.checked_ids(ids)
        expected = (*ids.shape, *self._embedding_shape)
        if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
            raise TypeError(
                f"{self.describe()}: a gradient must be a floating tensor, got {getattr(grad, 'dtype', grad)!r}"
            )
        if tuple(grad.shape) != expected:
            raise ValueError(f"{self.describe()}: gradient has shape {tuple(grad.shape)}, expected {expected}")
        if grad.device != self.device:
            raise ValueError(f"{self.describe()}: gradient is on {grad.device}, the table on {self.device}")
        if not self._requires_optimizer_state:
            raise RuntimeError(f"{self.describe()} is frozen (requires_optimizer_state=False): it takes no gradient")
        return ids.reshape(-1), grad.reshape(-1, self.embedding_dim)

    @property
    def grad_buffer(self) -> GradientBuffer:
        """Where backward leaves the table's gradient (keyed by row here, by id in a sharded table)."""
        return self._grad

    @property
    def has_grad(self) -> bool:
        """Whether a gradient (possibly of zero rows) arrived since the last ``clear_grad``."""
        return bool(self._grad)

    def grad(self, acc_step: int = 1) -> torch.Tensor:
        """The pending gradient as a sparse COO tensor ``(len(self), embedding_dim)`` indexed by row
        (``ids_map`` gives rows their ids), divided by ``acc_step`` (RecIS's name)."""
        if isinstance(acc_step, bool) or not isinstance(acc_step, int) or acc_step < 1:
            raise ValueError(f"{self.describe()}.grad: acc_step must be a positive int, got {acc_step!r}")
        pending = self.pending_grad()
        if pending is None:
            rows, values = torch.empty(0, dtype=torch.int64, device=self.device), torch.empty(0, self.embedding_dim)
        else:
            rows, values = pending
        size = (len(self), self.embedding_dim)
        indices, values = rows.reshape(1, -1), values.to(self.device) / acc_step
        return torch.sparse_coo_tensor(indices, values, size, check_invariants=True).coalesce()

    def pending_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The gradient received since ``clear_grad``, summed per row: ``(rows, grad)``.

        ``rows`` is distinct; ``grad`` is float32 ``(len(rows), embedding_dim)``. None when
        no gradient arrived (a table unused in the batch). Do not modify the result in
        place: it is the stored pending gradient itself.
        """
        return self._grad.summed()

    def grad_by_id(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pending gradient keyed by id, ``(distinct ids, float32 rows)``, or None."""
        pending = self.pending_grad()
        return None if pending is None else (self.ids_of_rows(pending[0]), pending[1])

    def restore_grad(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """Make ``(distinct ids, rows)`` the pending gradient, as ``grad_by_id`` returned it (a checkpoint's).

        Its rows are protected from eviction and filters in the current gradient window, as
        rows whose gradient arrived are (load the lifecycle state, which sets the window, first).
        """
        rows = self._store.find(ids.to(self.device))
        self._grad.clear()
        self._grad.add(rows, grad.to(self.device), distinct=True)
        self._lifecycle.protect(self._store, rows)

    def clear_grad(self) -> None:
        """Drop the pending gradient; its rows may be evicted again."""
        self._grad.clear()
        self._lifecycle.end_window()

    # ------------------------------------------------------------------ state dict
    # Keys under the table's prefix: "ids", "weight", "slots.<name>" for each optimizer
    # slot, and, while a gradient is pending (mid-accumulation), "pending_grad.ids" and
    # "pending_grad.values", so that a checkpoint taken between updates resumes exactly.
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        own = {"ids": self.local_ids(), "weight": self.weight.detach().reshape(len(self), *self._embedding_shape)}
        for name in self.slot_names():
            own[_SLOT_PREFIX + name] = self.slot(name).detach()
        for name in self._store.column_names():
            own[_COLUMN_PREFIX + name] = self._store.column(name).clone()
        for key, value in self._lifecycle.state().items():
            own[_LIFECYCLE_PREFIX + key] = value.clone()
        pending = self.grad_by_id()
        if pending is not None:
            own[_PENDING_IDS], own[_PENDING_VALUES] = pending
        destination.update((prefix + key, value) for key, value in own.items())
        note_table_state(self, own["ids"], [prefix + key for key in own])  # for split_sparse_dense_state_dict

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        ours = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        missing = [key for key in ("ids", "weight") if key not in ours]
        missing_keys.extend(prefix + key for key in missing)
        known = ("ids", "weight", _PENDING_IDS, _PENDING_VALUES)
        prefixes = (_SLOT_PREFIX, _COLUMN_PREFIX, _LIFECYCLE_PREFIX)
        unexpected_keys.extend(prefix + key for key in ours if key not in known and not key.startswith(prefixes))
        if missing:
            return
        problem = self._state_problem(ours)
        if problem:
            error_msgs.append(f"{self.describe()} at {prefix or '<root>'}: {problem}")
            return
        slots = _under(ours, _SLOT_PREFIX)
        if not self._requires_optimizer_state:  # no optimizer reads a frozen table's slots: keep only its own
            slots = {name: value for name, value in slots.items() if self._store.has_slot(name)}
        self.load_rows(ours["ids"], ours["weight"], slots, _under(ours, _COLUMN_PREFIX))
        lifecycle = _under(ours, _LIFECYCLE_PREFIX)
        if lifecycle:
            self._lifecycle.load_state(lifecycle)
        if _PENDING_IDS in ours and self._requires_optimizer_state:  # frozen: nothing would apply or clear it
            self.restore_grad(ours[_PENDING_IDS], ours[_PENDING_VALUES])

    def load_rows(
        self,
        ids: torch.Tensor,
        weight: torch.Tensor,
        slots: dict[str, torch.Tensor],
        columns: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Replace every row by distinct ``ids`` with their rows, slots and metadata columns
        (those the lifecycle keeps; absent ones start at zero); drops the pending gradient."""
        if self.capacity is not None and ids.numel() > self.capacity:
            raise ValueError(f"{self.describe()}: {ids.numel()} rows to load, over the capacity of {self.capacity}")
        columns = {name: value for name, value in (columns or {}).items() if self._store.has_column(name)}
        self._store.load(ids, weight, slots, columns)
        self._grad.clear()

    def _state_problem(self, ours: dict) -> str | None:
        """What is wrong with a state to load, or None; checked before anything changes."""
        ids, weight = ours["ids"], ours["weight"]
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
            return f"'ids' must be a 1-D int64 tensor, got {getattr(ids, 'dtype', type(ids))}"
        count = ids.numel()
        if torch.unique(ids).numel() != count:
            return "'ids' holds duplicate ids"
        problem = _matrix_problem("weight", weight, count, self.embedding_dim, self._embedding_shape)
        for key, value in ours.items():
            if problem is None and key.startswith(_SLOT_PREFIX):
                name = key[len(_SLOT_PREFIX) :]
                registered = self._store.slot(name) if self._store.has_slot(name) else None
                width = registered.shape[1] if registered is not None else getattr(value, "shape", (0, 0))[-1]
                problem = _matrix_problem(key, value, count, width)
        for key, value in ours.items():
            if problem is None and key.startswith(_COLUMN_PREFIX):
                if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or tuple(value.shape) != (count,):
                    problem = f"'{key}' must be an int64 tensor of shape ({count},)"
        if problem is None and any(key.startswith(_LIFECYCLE_PREFIX) for key in ours):
            problem = self._lifecycle.state_problem(_under(ours, _LIFECYCLE_PREFIX))
        if problem is None and self.capacity is not None and count > self.capacity:
            problem = f"{count} rows, more than the capacity of {self.capacity}"
        if problem is None and (_PENDING_IDS in ours) != (_PENDING_VALUES in ours):
            problem = f"'{_PENDING_IDS}' and '{_PENDING_VALUES}' must come together"
        if problem is None and _PENDING_IDS in ours:
            pending_ids = ours[_PENDING_IDS]
            if not isinstance(pending_ids, torch.Tensor) or pending_ids.dtype != torch.int64 or pending_ids.dim() != 1:
                return f"'{_PENDING_IDS}' must be a 1-D int64 tensor"
            problem = self._pending_ids_problem(pending_ids, ids) or _matrix_problem(
                _PENDING_VALUES, ours[_PENDING_VALUES], pending_ids.numel(), self.embedding_dim
            )
        return problem

    def _pending_ids_problem(self, pending_ids: torch.Tensor, ids: torch.Tensor) -> str | None:
        """A pending gradient is kept by row, so its ids must be among the loaded ones."""
        if not bool(torch.isin(pending_ids, ids).all()):
            return f"'{_PENDING_IDS}' names ids that are not in 'ids'"
        return None

    # ------------------------------------------------------------------ id checks
    def checked_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` as int64 on the table's device, or a clear ``TypeError``/``ValueError``."""
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{self.describe()}: ids must be an int64 tensor, got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{self.describe()}: ids must be an int64 tensor, got dtype {ids.dtype}")
        if ids.device != self.device:
            raise ValueError(f"{self.describe()}: ids are on {ids.device}, the table is on {self.device}")
        return ids.to(torch.int64)

    def _rows_of_present(self, flat_ids: torch.Tensor) -> torch.Tensor:
        rows = self._store.find(flat_ids)
        absent = rows < 0
        if bool(absent.any()):
            first = int(flat_ids[absent][0])
            raise KeyError(f"{self.describe()}: id {first} is not in the table ({int(absent.sum())} absent ids)")
        return rows

    def _read_or_initial(self, unique_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        absent = rows < 0
        if not bool(absent.any()):
            return self._store.gather(rows)
        values = torch.empty((rows.numel(), self.embedding_dim), dtype=self.dtype, device=self.device)
        values[~absent] = self._store.gather(rows[~absent])
        values[absent] = self.initial_values(unique_ids[absent])
        return values

    @torch.no_grad()
    def rows_of_lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of 1-D ids (repeats allowed) for a training lookup: absent ids are inserted
        (``rows_for``) and every id given counts as looked up in ``stats()``."""
        rows, absent = self._find_or_insert(ids)
        self._lifecycle.count_lookup(ids.numel(), ids.numel() - absent.sum())
        return rows


def _mean_over_occurrences(receive: GradReceiver, inverse: torch.Tensor, count: int, grad: torch.Tensor) -> None:
    occurrences = torch.bincount(inverse.reshape(-1), minlength=count).clamp(min=1)
    receive(grad / occurrences.unsqueeze(1).to(grad.dtype))


def filter_out_sparse_param(model: nn.Module) -> dict[str, HashTable]:
    """The hash tables of ``model``, each once, keyed by table name as RecIS keys them; a
    table without a name, or whose name another of the tables has, by its module path."""
    by_path = {path: module for path, module in model.named_modules() if isinstance(module, HashTable)}
    names = [table.name for table in by_path.values()]
    return {
        table.name if table.name and names.count(table.name) == 1 else path: table for path, table in by_path.items()
    }


def _under(entries: dict, prefix: str) -> dict:
    """The entries whose key starts with ``prefix``, keyed by the rest."""
    return {key[len(prefix) :]: value for key, value in entries.items() if key.startswith(prefix)}


def _matrix_problem(
    key: str, value: object, rows: int, width: int, row_shape: tuple[int, ...] | None = None
) -> str | None:
    """Why ``value`` is not a floating tensor of ``rows`` rows of ``width`` elements, or None."""
    expected = f"({rows}, {', '.join(map(str, row_shape or (width,)))})"
    if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or key.endswith(".step")):
        return f"'{key}' must be a floating tensor of shape {expected}, got {getattr(value, 'dtype', type(value))}"
    allowed = {(rows, width), (rows, *(row_shape or (width,)))} | ({(rows,)} if width == 1 else set())
    if tuple(value.shape) not in allowed:  # the shape, not just the element count: 0 rows of any width are 0 elements
        return f"'{key}' has shape {tuple(value.shape)}, expected {expected}"
    return None


__all__ = [
    "GRAD_REDUCTIONS",
    "HashTable",
    "Slice",
    "filter_out_sparse_param",
    "gen_slice",
    "split_sparse_dense_state_dict",
]
