"""Random call sequences: an error changes nothing, and the run stays equal to a control.

A seeded hypothesis state machine drives a small training run (``small_training_run``:
an unbounded and a bounded table, a dense layer, a sparse optimizer, AdamWTF, a
checkpoint root) through random calls: training steps with good ids, lookups with bad
ids and values, ``step``, ``zero_grad``, ``set_grad_accum_steps``, state-dict round
trips, loads of damaged table and optimizer state dicts, learning rates edited to good
and bad values, casts and a move to ``meta``, checkpoint saves and loads, of damaged
checkpoints too, and loads of state dicts remembered some calls earlier. After every call:

- a call that raised left everything bitwise as it was (``snapshot``: every table's ids
  in row order, rows, slots, metadata, lifecycle state, pending gradient and counters,
  the dense parameters and gradients, both optimizers' states and param groups);
- a call that succeeded is made on a control run too, driven only by the calls that
  succeeded, and the two runs are bitwise equal;
- a call that is bad input by construction raised.

Bounded: derandomized (the same sequences every run), 30 sequences of up to 30 calls,
each with its sparse optimizer (SparseAdamW, SparseAdamWTF or SparseAdam) and eviction
policy drawn; the file took 21-27 s on the 2-core machine under a load average of 6-7.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test
from small_training_run import DIM, SmallTrainingRun, first_difference, snapshot

import recis.checkpoint as ck
from recis.checkpoint.manifest import resolve
from recis.optim import SparseAdam, SparseAdamW, SparseAdamWTF

Act = Callable[[SmallTrainingRun], object]

STATE_OWNERS = ("model", "sparse", "dense")
ID_POOL = [*range(16), -1, -(2**63), 2**63 - 1]
ids_lists = st.lists(st.sampled_from(ID_POOL), max_size=7)
table_names = st.sampled_from(["free", "bounded"])


def _ids(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


# --------------------------------------------------------------------------- bad calls on a table
def _bad_ids(kind: str) -> object:
    return {
        "float32": torch.tensor([1.0, 2.0]),
        "float64": torch.tensor([1.0, 2.0], dtype=torch.float64),
        "bool": torch.tensor([True, False]),
        "complex": torch.tensor([1 + 0j, 2 + 0j]),
        "list": [1, 2],
        "meta": torch.tensor([1, 2], device="meta"),
    }[kind]


def _eval_lookup(table, ids) -> object:
    table.eval()
    try:
        return table(ids)
    finally:
        table.train()


TABLE_CALLS: dict[str, Callable] = {
    "forward": lambda table, ids: table(ids),
    "forward_eval": _eval_lookup,
    "lookup": lambda table, ids: table.lookup(ids),
    "assign": lambda table, ids: table.assign(ids, torch.zeros(2, DIM)),
    "accept_grad": lambda table, ids: table.accept_grad(ids, torch.zeros(2, DIM)),
}

# Bad values or gradients with good ids (ids 0 and 1 may or may not have rows).
BAD_TABLE_VALUES: dict[str, Callable] = {
    "assign_wrong_width": lambda table: table.assign(_ids([0, 1]), torch.zeros(2, DIM + 1)),
    "assign_int_values": lambda table: table.assign(_ids([0, 1]), torch.zeros(2, DIM, dtype=torch.int64)),
    "assign_too_few_rows": lambda table: table.assign(_ids([0, 1]), torch.zeros(1, DIM)),
    "accept_grad_absent_id": lambda table: table.accept_grad(_ids([424242]), torch.zeros(1, DIM)),
    "accept_grad_wrong_width": lambda table: table.accept_grad(table.ids()[:1], torch.zeros(1, DIM + 2)),
    "accept_grad_int": lambda table: table.accept_grad(table.ids()[:1], torch.zeros(1, DIM, dtype=torch.int32)),
}


# --------------------------------------------------------------------------- damaged state dicts
def _first_entry(state: dict) -> dict | None:
    return next(iter(state["state"].values()), None)


def _set_step(value) -> Callable[[dict], bool]:
    def corrupt(state: dict) -> bool:
        entry = _first_entry(state)
        if entry is None:
            return False
        entry["step"] = value
        return True

    return corrupt


def _pop_from_first_entry(key: str) -> Callable[[dict], bool]:
    def corrupt(state: dict) -> bool:
        entry = _first_entry(state)
        return entry is not None and entry.pop(key, None) is not None

    return corrupt


def _move_first_entry(index) -> Callable[[dict], bool]:
    def corrupt(state: dict) -> bool:
        if not state["state"]:
            return False
        state["state"][index] = state["state"].pop(next(iter(state["state"])))
        return True

    return corrupt


def _set_in_group(key: str, value) -> Callable[[dict], bool]:
    def corrupt(state: dict) -> bool:
        state["param_groups"][-1][key] = value
        return True

    return corrupt


def _set_top(key: str, value) -> Callable[[dict], bool]:
    def corrupt(state: dict) -> bool:
        state[key] = value
        return True

    return corrupt


def _drop_last_group(state: dict) -> bool:
    state["param_groups"].pop()
    return True


def _extra_in_first_entry(state: dict) -> bool:
    entry = _first_entry(state)
    if entry is None:
        return False
    entry["exp_avg"] = torch.zeros(3)
    return True


# Each must be refused by the sparse optimizer's load_state_dict; None: not applicable now.
SPARSE_STATE_DAMAGE: dict[str, Callable[[dict], bool]] = {
    "step_-1": _set_step(-1),
    "step_nan": _set_step(math.nan),
    "step_x": _set_step("x"),
    "step_none": _set_step(None),
    "step_true": _set_step(True),
    "step_1.5": _set_step(1.5),
    "no_nonfinite_rows": _pop_from_first_entry("nonfinite_rows"),
    "no_step": _pop_from_first_entry("step"),
    "extra_key": _extra_in_first_entry,
    "entry_of_absent_table": _move_first_entry(5),
    "entry_keyed_by_str": _move_first_entry("0"),
    "group_lr_-1": _set_in_group("lr", -1.0),
    "group_lr_nan": _set_in_group("lr", math.nan),
    "group_lr_x": _set_in_group("lr", "x"),
    "group_betas": _set_in_group("betas", (1.0, 0.9)),
    "group_eps_-1": _set_in_group("eps", -1.0),
    "one_group_fewer": _drop_last_group,
    "grad_accum_steps_0": _set_top("grad_accum_steps", 0),
    "accum_phase_past_steps": _set_top("accum_phase", 7),
}

# Each must be refused by AdamWTF's load_state_dict.
DENSE_STATE_DAMAGE: dict[str, Callable[[dict], bool]] = {
    "step_-1": _set_step(torch.tensor(-1.0)),
    "step_nan": _set_step(torch.tensor(math.nan)),
    "step_x": _set_step("x"),
    "step_none": _set_step(None),
    "step_1.5": _set_step(torch.tensor(1.5)),
    "no_exp_avg": _pop_from_first_entry("exp_avg"),
    "no_step": _pop_from_first_entry("step"),
    "entry_of_absent_param": _move_first_entry(7),
    "group_lr_-1": _set_in_group("lr", -1.0),
    "group_lr_nan": _set_in_group("lr", math.nan),
    "one_group_fewer": _drop_last_group,
}


def _wrong_exp_avg_shape(state: dict) -> bool:
    entry = _first_entry(state)
    if entry is None:
        return False
    entry["exp_avg"] = torch.zeros(3, 3)
    return True


DENSE_STATE_DAMAGE["exp_avg_shape"] = _wrong_exp_avg_shape


def _table_state_damage(kind: str, state: dict) -> bool:
    """Damage a table's own state dict (keys without a prefix); False when not applicable."""
    count = state["ids"].numel()
    if kind == "weight_width":
        state["weight"] = torch.zeros(count, DIM - 1)
    elif kind == "weight_int":
        state["weight"] = state["weight"].to(torch.int64)
    elif kind == "ids_float":
        state["ids"] = state["ids"].to(torch.float64)
    elif kind == "ids_repeated":
        if count < 2:
            return False
        state["ids"] = state["ids"].clone()
        state["ids"][1] = state["ids"][0]
    elif kind == "no_ids":
        del state["ids"]
    elif kind == "unknown_key":
        state["bogus"] = torch.zeros(1)
    elif kind == "slot_width":
        slots = [key for key in state if key.startswith("slots.")]
        if not slots:
            return False
        state[slots[0]] = torch.zeros(count, 9)
    elif kind == "pending_unknown_id":
        state["pending_grad.ids"] = _ids([987654])
        state["pending_grad.values"] = torch.zeros(1, DIM)
    elif kind == "rows_over_capacity":
        extra = torch.arange(1000, 1012)
        state["ids"] = torch.cat([state["ids"], extra])
        state["weight"] = torch.cat([state["weight"], torch.zeros(12, DIM, dtype=state["weight"].dtype)])
        for key in [k for k in state if k.startswith(("slots.", "meta."))]:
            value = state[key]
            if value.dim() >= 1 and value.shape[0] == count:
                state[key] = torch.cat([value, torch.zeros(12, *value.shape[1:], dtype=value.dtype)])
        return True
    return True


TABLE_STATE_DAMAGE = [
    "weight_width",
    "weight_int",
    "ids_float",
    "ids_repeated",
    "no_ids",
    "unknown_key",
    "slot_width",
    "pending_unknown_id",
    "rows_over_capacity",
]


# --------------------------------------------------------------------------- damaged checkpoints
def _flip_bit(path: Path, fraction: float, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[min(int(fraction * len(data)), len(data) - 1)] ^= 1 << bit
    path.write_bytes(bytes(data))


def _resize(path: Path, fraction: float, bit: int) -> None:
    """Truncated, or one byte longer if it was empty."""
    data = path.read_bytes()
    path.write_bytes(data[: min(int(fraction * len(data)), len(data) - 1)] if data else b"\0")


def _delete(path: Path, fraction: float, bit: int) -> None:
    path.unlink()


def _empty_json(path: Path, fraction: float, bit: int) -> None:
    path.write_text("{}")


CHECKPOINT_DAMAGE = {"flip": _flip_bit, "resize": _resize, "delete": _delete, "empty_json": _empty_json}
CHECKPOINT_FILES = ["manifest.json", "rank00000.pt", "rank00000.bin"]


def _damaged_copy(run: SmallTrainingRun, file: str, damage: str, fraction: float, bit: int) -> Path:
    copy_dir = run.fresh_scratch()
    shutil.copytree(resolve(run.root), copy_dir)
    CHECKPOINT_DAMAGE[damage](copy_dir / file, fraction, bit)
    return copy_dir


# --------------------------------------------------------------------------- the machine
BAD_IDS = ["float32", "float64", "bool", "complex", "list", "meta"]
# One strategy for every bad call, as (method of the machine, its arguments).
bad_calls = st.one_of(
    st.tuples(
        st.just("bad_ids"), st.tuples(table_names, st.sampled_from(sorted(TABLE_CALLS)), st.sampled_from(BAD_IDS))
    ),
    st.tuples(st.just("bad_values"), st.tuples(table_names, st.sampled_from(sorted(BAD_TABLE_VALUES)))),
    st.tuples(st.just("load_damaged_sparse_state"), st.tuples(st.sampled_from(sorted(SPARSE_STATE_DAMAGE)))),
    st.tuples(st.just("load_dense_state_into_sparse"), st.just(())),
    st.tuples(st.just("load_sparse_state_into_dense"), st.just(())),
    st.tuples(st.just("load_damaged_dense_state"), st.tuples(st.sampled_from(sorted(DENSE_STATE_DAMAGE)))),
    st.tuples(st.just("load_damaged_table_state"), st.tuples(table_names, st.sampled_from(TABLE_STATE_DAMAGE))),
)


class RandomCallSequences(RuleBasedStateMachine):
    """A run and its control; every rule is one call (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="recis-fuzz-"))
        self.run = self.control = None

    @initialize(
        sparse_cls=st.sampled_from([SparseAdamW, SparseAdamWTF, SparseAdam]), eviction=st.sampled_from(["lru", "lfu"])
    )
    def build(self, sparse_cls: type, eviction: str) -> None:
        self.run = SmallTrainingRun(self.folder / "run", sparse_cls, eviction)
        self.control = SmallTrainingRun(self.folder / "control", sparse_cls, eviction)

    def teardown(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def call(self, label: str, act: Act, must_fail: bool = False, control_act: Act | None = None) -> None:
        """Make the call on the run; check the invariants; repeat it on the control if it succeeded."""
        before = snapshot(self.run)
        try:
            act(self.run)
        except Exception as error:  # any error at all must leave the run as it was
            where = first_difference(before, snapshot(self.run))
            assert where is None, f"{label} raised {type(error).__name__}: {error}, and changed {where}"
            return
        assert not must_fail, f"{label} is bad input and did not raise"
        (control_act or act)(self.control)
        where = first_difference(snapshot(self.run), snapshot(self.control))
        assert where is None, f"after {label}, the run differs from its control at {where}"

    # ----------------------------------------------------------------- training
    @rule(free=ids_lists, bounded=ids_lists, int32=st.booleans())
    def train(self, free: list[int], bounded: list[int], int32: bool) -> None:
        dtype = torch.int32 if int32 else torch.int64
        free = [i for i in free if not int32 or -(2**31) <= i < 2**31]
        bounded = [i for i in bounded if not int32 or -(2**31) <= i < 2**31]

        def act(run: SmallTrainingRun) -> None:
            free_ids, bounded_ids = torch.tensor(free, dtype=dtype), torch.tensor(bounded, dtype=dtype)
            run.model.loss(free_ids, bounded_ids).backward()

        self.call(f"train(free={free}, bounded={bounded}, {dtype})", act)

    @rule(sparse=st.booleans())
    def step(self, sparse: bool) -> None:
        self.call(f"{'sparse' if sparse else 'dense'}.step()", lambda run: (run.sparse if sparse else run.dense).step())

    @rule(sparse=st.booleans(), set_to_none=st.booleans())
    def zero_grad(self, sparse: bool, set_to_none: bool) -> None:
        label = f"{'sparse' if sparse else 'dense'}.zero_grad({set_to_none})"
        self.call(label, lambda run: (run.sparse if sparse else run.dense).zero_grad(set_to_none=set_to_none))

    @rule(steps=st.sampled_from([1, 2, 3, 0, -1, 1.5, True, "2", None]))
    def set_grad_accum_steps(self, steps) -> None:
        must_fail = isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        self.call(f"set_grad_accum_steps({steps!r})", lambda run: run.sparse.set_grad_accum_steps(steps), must_fail)

    @rule(
        sparse=st.booleans(),
        group=st.sampled_from([0, 1]),
        lr=st.sampled_from([0.0, 0.01, 0.1, 0.1, -1.0, math.nan, math.inf, "x", None]),
    )
    def edit_lr(self, sparse: bool, group: int, lr) -> None:
        """An edit as a scheduler or a user makes it (never refused: the next step checks it)."""

        def act(run: SmallTrainingRun) -> None:
            (run.sparse if sparse else run.dense).param_groups[group]["lr"] = lr

        self.call(f"{'sparse' if sparse else 'dense'}.param_groups[{group}]['lr'] = {lr!r}", act)

    @rule(name=table_names, threshold=st.integers(1, 3))
    def run_filter(self, name: str, threshold: int) -> None:
        def act(run: SmallTrainingRun) -> None:
            table = run.tables()[name]
            if table.lifecycle.filter_hook is not None:
                table.advance_filter_step(threshold)
                table.run_filter()

        self.call(f"{name}: advance_filter_step({threshold}); run_filter()", act)

    @rule(name=table_names, ids=ids_lists, value=st.sampled_from([0.5, -2.0, math.nan]))
    def assign(self, name: str, ids: list[int], value: float) -> None:
        def act(run: SmallTrainingRun) -> None:
            run.tables()[name].assign(_ids(ids), torch.full((len(ids), DIM), value))

        self.call(f"{name}.assign({ids}, {value})", act)

    # ----------------------------------------------------------------- bad calls
    @rule(bad=bad_calls)
    def bad_call(self, bad: tuple[str, tuple]) -> None:
        """One bad call (one rule for all of them keeps good calls frequent)."""
        method, arguments = bad
        getattr(self, method)(*arguments)

    def bad_ids(self, name: str, call: str, kind: str) -> None:
        self.call(f"{name}.{call}(ids={kind})", lambda run: TABLE_CALLS[call](run.tables()[name], _bad_ids(kind)), True)

    def bad_values(self, name: str, kind: str) -> None:
        self.call(f"{name}: {kind}", lambda run: BAD_TABLE_VALUES[kind](run.tables()[name]), True)

    # ----------------------------------------------------------------- state dicts
    @rule(which=st.sampled_from(["model", "sparse", "dense", "all"]))
    def state_dict_round_trip(self, which: str) -> None:
        """The model's or an optimizer's own state dict (or all three) loads back and changes nothing."""
        before = snapshot(self.run)

        def act(run: SmallTrainingRun) -> None:
            for name in STATE_OWNERS if which == "all" else (which,):
                owner = getattr(run, name)
                owner.load_state_dict(copy.deepcopy(owner.state_dict()))

        self.call(f"{which} state dict round trip", act)
        assert first_difference(before, snapshot(self.run)) is None, "a state dict round trip changed the run"

    @rule(remember=st.booleans(), which=st.sampled_from(["model", "sparse", "dense"]))
    def earlier_state(self, remember: bool, which: str) -> None:
        """Remember the three state dicts of the run and of the control, or load a remembered one
        (taken any number of calls ago: it may not fit any more, after a cast say)."""
        if remember:
            for run in (self.run, self.control):
                run.remembered = {name: copy.deepcopy(getattr(run, name).state_dict()) for name in STATE_OWNERS}
        elif self.run.remembered is not None:
            self.call(
                f"{which}.load_state_dict(remembered)",
                lambda run: getattr(run, which).load_state_dict(copy.deepcopy(run.remembered[which])),
            )

    def load_damaged_sparse_state(self, kind: str) -> None:
        state = copy.deepcopy(self.run.sparse.state_dict())
        if SPARSE_STATE_DAMAGE[kind](state):
            self.call(f"sparse.load_state_dict({kind})", lambda run: run.sparse.load_state_dict(state), True)

    def load_dense_state_into_sparse(self) -> None:
        state = copy.deepcopy(self.run.dense.state_dict())
        self.call("sparse.load_state_dict(AdamWTF's)", lambda run: run.sparse.load_state_dict(state), True)

    def load_sparse_state_into_dense(self) -> None:
        state = copy.deepcopy(self.run.sparse.state_dict())
        self.call("dense.load_state_dict(the sparse one's)", lambda run: run.dense.load_state_dict(state), True)

    def load_damaged_dense_state(self, kind: str) -> None:
        state = copy.deepcopy(self.run.dense.state_dict())
        if DENSE_STATE_DAMAGE[kind](state):
            self.call(f"dense.load_state_dict({kind})", lambda run: run.dense.load_state_dict(state), True)

    def load_damaged_table_state(self, name: str, kind: str) -> None:
        table = self.run.tables()[name]
        state = {key: value.clone() for key, value in table.state_dict().items()}
        if kind == "rows_over_capacity" and table.capacity is None:
            return
        if _table_state_damage(kind, state):
            self.call(f"{name}.load_state_dict({kind})", lambda run: run.tables()[name].load_state_dict(state), True)

    @rule(source=table_names, into=table_names)
    def load_other_tables_state(self, source: str, into: str) -> None:
        """One table's state into the other: loads or is refused (a bounded table's is richer)."""
        state = {key: value.clone() for key, value in self.run.tables()[source].state_dict().items()}
        self.call(f"{into}.load_state_dict({source}'s)", lambda run: run.tables()[into].load_state_dict(state))

    # ----------------------------------------------------------------- moves and casts
    @rule(
        what=st.sampled_from(["free", "bounded", "model"]),
        to=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, "cpu", "meta"]),
    )
    def move(self, what: str, to) -> None:
        """A whole model is not moved to meta: torch's ``Module._apply`` moves the dense layer
        before a table refuses (outside recis's guarantee; ``test_nothing_changes_on_error``)."""
        if what == "model" and to == "meta":
            return

        def act(run: SmallTrainingRun) -> None:
            module = run.model if what == "model" else run.tables()[what]
            module.to(to)

        self.call(f"{what}.to({to})", act, must_fail=to == "meta")

    # ----------------------------------------------------------------- checkpoints
    @rule(save=st.booleans())
    def checkpoint(self, save: bool) -> None:
        if save:
            self.call("checkpoint.save", lambda run: ck.save(run.root, run.model, run.sparse, run.dense, keep=2))
        else:
            self.call("checkpoint.load", lambda run: ck.load(run.root, run.model, run.sparse, run.dense))

    @precondition(lambda self: self.run is not None and self.run.saved_checkpoints())
    @rule(
        file=st.sampled_from(CHECKPOINT_FILES),
        damage=st.sampled_from(sorted(CHECKPOINT_DAMAGE)),
        fraction=st.floats(0, 1),
        bit=st.integers(0, 7),
    )
    def load_damaged_checkpoint(self, file: str, damage: str, fraction: float, bit: int) -> None:
        """Refused, or (a flip that changes no value) the checkpoint as saved, as a clean load gives."""

        def act(run: SmallTrainingRun) -> None:
            ck.load(_damaged_copy(run, file, damage, fraction, bit), run.model, run.sparse, run.dense)

        def clean(run: SmallTrainingRun) -> None:
            ck.load(run.root, run.model, run.sparse, run.dense)

        label = f"checkpoint.load(damaged: {file} {damage} at {fraction:.3f}, bit {bit})"
        self.call(label, act, must_fail=damage != "flip", control_act=clean)


SETTINGS = settings(
    max_examples=30,
    stateful_step_count=30,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no explain phase: it traces every line (slow)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


def test_random_call_sequences_change_nothing_on_error_and_match_a_control():
    run_state_machine_as_test(RandomCallSequences, settings=SETTINGS)
