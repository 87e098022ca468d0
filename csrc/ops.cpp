// The operator schemas of the recis native library, in one place. Each kernel file
// registers its CPU (csrc/cpu/) or CUDA (csrc/cuda/binding.cpp) implementation; the
// Python side calls them as torch.ops.recis.<name> (recis/ops/native_kernels.py,
// recis/ops/native_id_map.py). `decay` and `epsilon` are the codes of WeightDecay and
// EpsilonPlacement in common/adam_rule.h.
#include <torch/library.h>

TORCH_LIBRARY(recis, m) {
  // grad: the rows of its pieces' concatenation; sum_repeated_rows: rows may repeat (both CPU only)
  m.def(
      "sparse_adam_update(Tensor(a!) weight, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor rows, Tensor[] grad, "
      "Tensor(d!)? row_steps, float lr, float beta1, float beta2, float eps, float weight_decay, int decay, "
      "int epsilon, bool maximize, int step, float grad_divisor, bool sum_repeated_rows) -> ()");
  // CPU only (on CUDA the torch kernel runs); lr already decayed for the table's step
  m.def(
      "sparse_adagrad_update(Tensor(a!) weight, Tensor(b!) slot, Tensor rows, Tensor[] grad, Tensor? grad_sq, "
      "bool row_wise, float lr, float initial_accumulator_value, float eps, float weight_decay, bool maximize, "
      "float grad_divisor, bool sum_repeated_rows) -> ()");
  // grads: the rows of their pieces' concatenation (one piece on CUDA)
  m.def("coalesce_rows(Tensor rows, Tensor[] grads) -> (Tensor, Tensor)");
  m.def("gather_rows(Tensor[] pieces, Tensor index) -> Tensor");  // CPU only
  // CPU only, as id_map_drop_tombstones: on CUDA the torch kernels run (recis/ops/backend.py)
  m.def("sum_by_index(Tensor index, Tensor values, int count) -> Tensor");
  m.def("owner_rank(Tensor ids, int world_size) -> Tensor");
  m.def("unique_by_owner(Tensor ids, int world_size) -> (Tensor unique, Tensor inverse, Tensor counts)");
  m.def("id_map_find(Tensor buckets, Tensor ids) -> Tensor");
  m.def("id_map_insert(Tensor(a!) buckets, Tensor ids, Tensor rows) -> ()");
  m.def("id_map_erase(Tensor(a!) buckets, Tensor ids) -> Tensor");
  m.def("id_map_rehash(Tensor buckets, int bucket_count) -> Tensor");
  m.def("id_map_drop_tombstones(Tensor(a!) buckets) -> ()");  // CPU only (NativeIdMap rehashes on CUDA)
  m.def(
      "adamw_tf_multi_tensor(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, bool maximize) -> ()");
}
