// One decoder layer of a decode step in one call (torch.ops.llmkit_cpu.decode_layer): the
// same kernels, in the same order and with the same roundings, as the Python layer
// (models/llama.py DecoderLayer with layers/*.py) runs for a step whose every token is its
// sequence's next one, without the Python between them. A DecodeStack
// (torch.classes.llmkit_cpu.DecodeStack) holds every layer's arguments, its KV cache
// included, and runs all the layers of a step in one call; given the model's head (the
// embedding, the rotary tables, the final norm and the lm_head), the whole step from token
// ids to logits, as LlamaModel.forward computes them. The Python side decides when they
// apply (layers/decode_layer.py).
//
// Each Linear is a kind and its tensors, a bias last when it has one:
//   0 dense_linear [weight]            1 q4_linear  [packed, scales, zeros] (+ group size)
//   2 q8_linear    [q, scale]          3 w8a8_linear [q, scale]
//   4 pairs_linear [packed] (registered only where the CPU has AVX512-BF16)

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using Linear2 = at::Tensor(at::Tensor, at::Tensor, at::Tensor);

at::Tensor linear(const at::Tensor& x, int64_t kind, at::TensorList w, int64_t group_size) {
  static const auto dense = find<at::Tensor(at::Tensor, at::Tensor)>("llmkit_cpu::dense_linear");
  static const auto q4 =
      find<at::Tensor(at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t)>(
          "llmkit_cpu::q4_linear");
  static const auto q8 = find<Linear2>("llmkit_cpu::q8_linear");
  static const auto w8a8 = find<Linear2>("llmkit_cpu::w8a8_linear");
  static constexpr size_t kTensors[] = {1, 3, 2, 2, 1};
  TORCH_CHECK(kind >= 0 && kind < 5, "decode_layer: unknown Linear kind ", kind);
  const size_t count = kTensors[kind];
  TORCH_CHECK(w.size() == count || w.size() == count + 1, "decode_layer: a Linear of kind ",
              kind, " takes ", count, " tensors and a bias");
  at::Tensor y;
  switch (kind) {
    case 0: y = dense.call(x, w[0]); break;
    case 1: y = q4.call(x, w[0], w[1], w[2], group_size); break;
    case 2: y = q8.call(x, w[0], w[1]); break;
    case 3: y = w8a8.call(x, w[0], w[1]); break;
    default: {  // looked up on first use: registered only on some CPUs
      static const auto pairs =
          find<at::Tensor(at::Tensor, at::Tensor)>("llmkit_cpu::pairs_linear");
      y = pairs.call(x, w[0]);
    }
  }
  return w.size() > count ? y + w[count] : y;
}

std::tuple<at::Tensor, at::Tensor> decode_layer(
    at::Tensor x, const std::optional<at::Tensor>& residual, at::Tensor input_norm,
    at::Tensor post_norm, double eps, at::TensorList qkv, at::TensorList o,
    at::TensorList gate_up, at::TensorList down, at::IntArrayRef kinds,
    at::IntArrayRef group_sizes, at::Tensor cos, at::Tensor sin, at::Tensor k_cache,
    at::Tensor v_cache, at::Tensor slots, at::Tensor block_tables, at::Tensor context_lens,
    int64_t num_heads, int64_t num_kv_heads, double scale) {
  static const auto add_rms_norm =
      find<at::Tensor(at::Tensor, at::Tensor, at::Tensor, double)>("llmkit_cpu::add_rms_norm");
  static const auto attention =
      find<at::Tensor(at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                      at::Tensor, at::Tensor, int64_t, double)>("llmkit_cpu::decode_attention");
  static const auto silu_mul = find<at::Tensor(at::Tensor)>("llmkit_cpu::silu_mul");
  TORCH_CHECK(kinds.size() == 4 && group_sizes.size() == 4,
              "decode_layer: a kind and a group size for each of qkv, o, gate_up, down");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(),
              "decode_layer: x must be contiguous [tokens, hidden]");

  // the residual stream and the normed input (RMSNorm.forward / add_and_norm)
  at::Tensor res, h;
  if (residual.has_value()) {
    res = *residual;
    h = add_rms_norm.call(res, x, input_norm, eps);
  } else {  // norm(0 + x): the same bits as RMSNorm.forward(x)
    res = at::zeros_like(x);
    h = add_rms_norm.call(res, x, input_norm, eps);
  }

  // attention (Attention.forward, apply_rotary, paged_attention)
  TORCH_CHECK(k_cache.size(1) == num_kv_heads, "decode_layer: the cache has ", k_cache.size(1),
              " KV heads, not ", num_kv_heads);
  const at::Tensor attn =
      attention.call(linear(h, kinds[0], qkv, group_sizes[0]), cos, sin, k_cache, v_cache, slots,
                     block_tables, context_lens, num_heads, scale);
  const at::Tensor attn_out = linear(attn, kinds[1], o, group_sizes[1]);

  // MLP (add_and_norm, MLP.forward, silu_and_mul)
  h = add_rms_norm.call(res, attn_out, post_norm, eps);
  const at::Tensor act = silu_mul.call(linear(h, kinds[2], gate_up, group_sizes[2]));
  return {linear(act, kinds[3], down, group_sizes[3]), res};
}

// Every layer of a model, each as decode_layer takes it, built once: a step passes only the
// hidden states and what says where its tokens are.
class DecodeStack : public torch::CustomClassHolder {
 public:
  // tensors: per layer its input norm, post-attention norm, K cache and V cache, then the
  // tensors of its qkv, o, gate_up and down Linears, counts[4 l + i] of them for Linear i;
  // kinds and group_sizes: 4 per layer.
  DecodeStack(std::vector<at::Tensor> tensors, std::vector<int64_t> counts,
              std::vector<int64_t> kinds, std::vector<int64_t> group_sizes, double eps,
              int64_t num_heads, int64_t num_kv_heads, double scale)
      : eps_(eps), num_heads_(num_heads), num_kv_heads_(num_kv_heads), scale_(scale) {
    const size_t n = counts.size() / 4;
    TORCH_CHECK(counts.size() == 4 * n && kinds.size() == 4 * n && group_sizes.size() == 4 * n,
                "DecodeStack: 4 counts, kinds and group sizes per layer");
    size_t at = 0;
    auto next = [&]() {
      TORCH_CHECK(at < tensors.size(), "DecodeStack: fewer tensors than the counts say");
      return tensors[at++];
    };
    for (size_t l = 0; l < n; ++l) {
      Layer layer{next(), next(), next(), next()};
      for (size_t i = 0; i < 4; ++i) {
        for (int64_t c = 0; c < counts[4 * l + i]; ++c) layer.linears[i].push_back(next());
        layer.kinds.push_back(kinds[4 * l + i]);
        layer.group_sizes.push_back(group_sizes[4 * l + i]);
      }
      layers_.push_back(std::move(layer));
    }
    TORCH_CHECK(at == tensors.size(), "DecodeStack: more tensors than the counts say");
  }

  // (the last layer's output, the residual stream), as the layers one after another give them
  std::tuple<at::Tensor, at::Tensor> run(at::Tensor x, at::Tensor cos, at::Tensor sin,
                                         at::Tensor slots, at::Tensor block_tables,
                                         at::Tensor context_lens) {
    std::optional<at::Tensor> residual;
    for (const Layer& l : layers_) {
      auto [out, res] = decode_layer(x, residual, l.input_norm, l.post_norm, eps_, l.linears[0],
                                     l.linears[1], l.linears[2], l.linears[3], l.kinds,
                                     l.group_sizes, cos, sin, l.k_cache, l.v_cache, slots,
                                     block_tables, context_lens, num_heads_, num_kv_heads_, scale_);
      x = out;
      residual = res;
    }
    TORCH_CHECK(residual.has_value(), "DecodeStack: no layers");
    return {x, *residual};
  }

  // embed: [vocab rows, hidden]; cos, sin: float32 [positions, head_dim]; the lm_head a
  // Linear of `kind` whose first `vocab` outputs are the logits.
  void set_head(at::Tensor embed, at::Tensor cos, at::Tensor sin, at::Tensor norm,
                double norm_eps, int64_t kind, std::vector<at::Tensor> lm_head,
                int64_t group_size, int64_t vocab) {
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.sizes() == cos.sizes(),
                "DecodeStack: the rotary tables must be float32 and of one shape");
    head_ = Head{embed, cos, sin, norm, norm_eps, kind, std::move(lm_head), group_size, vocab};
  }

  // float32 logits [rows, vocab] of the step's tokens `rows` (LlamaModel.forward's
  // logits_indices) for tokens `ids` at `positions`.
  at::Tensor logits(at::Tensor ids, at::Tensor positions, at::Tensor slots,
                    at::Tensor block_tables, at::Tensor context_lens, at::Tensor rows) {
    return head_logits(ids, positions, slots, block_tables, context_lens, rows).to(at::kFloat);
  }

  // `steps` greedy decode steps of sequences whose next tokens are `ids` at `positions`,
  // each step's tokens the argmax of the previous step's logits (a NaN counting as largest,
  // the first largest winning, as torch's argmax): int64 [sequences, steps], the tokens
  // the steps chose. Step j writes its K/V to slots[j] and sees context_lens + j keys; the
  // block tables cover every step.
  at::Tensor greedy_steps(at::Tensor ids, at::Tensor positions, at::Tensor slots,
                          at::Tensor block_tables, at::Tensor context_lens, int64_t steps) {
    const int64_t rows = ids.size(0);
    TORCH_CHECK(steps >= 1 && slots.dim() == 2 && slots.size(0) == steps &&
                    slots.size(1) == rows && positions.size(0) == rows &&
                    context_lens.size(0) == rows,
                "DecodeStack: greedy_steps takes a slot per sequence and step");
    static const auto argmax = find<at::Tensor(at::Tensor)>("llmkit_cpu::argmax_rows");
    at::Tensor chosen = at::empty({rows, steps}, ids.options());
    // argmax_rows gives the logits in the model's dtype the index their float32 copy gives
    for (int64_t j = 0; j < steps; ++j) {
      ids = argmax.call(head_logits(ids, positions + j, slots[j], block_tables,
                                    context_lens + j, std::nullopt));
      chosen.select(1, j).copy_(ids);
    }
    return chosen;
  }

 private:
  // The logits in the model's dtype, [rows, vocab] (every token's without `rows`): a view
  // of the lm_head's output, whose rows are padded past the vocabulary in some layouts.
  at::Tensor head_logits(const at::Tensor& ids, const at::Tensor& positions,
                         const at::Tensor& slots, const at::Tensor& block_tables,
                         const at::Tensor& context_lens, const std::optional<at::Tensor>& rows) {
    static const auto add_rms_norm =
        find<at::Tensor(at::Tensor, at::Tensor, at::Tensor, double)>("llmkit_cpu::add_rms_norm");
    TORCH_CHECK(head_.has_value(), "DecodeStack: no head was set");
    const Head& head = *head_;
    const at::Tensor x = head.embed.index_select(0, ids);
    const auto dtype = x.scalar_type();  // the rotary tables rounded to it, as Rotary does
    const at::Tensor cos = head.cos.index_select(0, positions).to(dtype);
    const at::Tensor sin = head.sin.index_select(0, positions).to(dtype);
    auto [h, residual] = run(x, cos, sin, slots, block_tables, context_lens);
    if (rows.has_value()) {
      h = h.index_select(0, *rows);
      residual = residual.index_select(0, *rows);
    }
    const at::Tensor normed = add_rms_norm.call(residual, h, head.norm, head.eps);
    return linear(normed, head.kind, head.lm_head, head.group_size).narrow(1, 0, head.vocab);
  }

  struct Head {
    at::Tensor embed, cos, sin, norm;
    double eps;
    int64_t kind;
    std::vector<at::Tensor> lm_head;
    int64_t group_size, vocab;
  };
  std::optional<Head> head_;
  struct Layer {
    at::Tensor input_norm, post_norm, k_cache, v_cache;
    std::vector<at::Tensor> linears[4];
    std::vector<int64_t> kinds, group_sizes;
  };
  std::vector<Layer> layers_;
  double eps_;
  int64_t num_heads_, num_kv_heads_;
  double scale_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmkit_cpu, m) {
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>,
                       std::vector<int64_t>, double, int64_t, int64_t, double>())
      .def("run", &DecodeStack::run)
      .def("set_head", &DecodeStack::set_head)
      .def("logits", &DecodeStack::logits)
      .def("greedy_steps", &DecodeStack::greedy_steps);
  m.def(
      "decode_layer(Tensor(a!) x, Tensor(b!)? residual, Tensor input_norm, Tensor post_norm, "
      "float eps, Tensor[] qkv, Tensor[] o, Tensor[] gate_up, Tensor[] down, int[] kinds, "
      "int[] group_sizes, Tensor cos, Tensor sin, Tensor(c!) k_cache, Tensor(d!) v_cache, "
      "Tensor slots, Tensor block_tables, Tensor context_lens, int num_heads, "
      "int num_kv_heads, float scale) -> (Tensor, Tensor)");
  m.impl("decode_layer", c10::DispatchKey::CPU, decode_layer);
}
