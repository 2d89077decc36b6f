// The CUDA built-ins and PTX instructions llmkit's CUDA C++ kernels (llmkit/kernels/*.cu)
// use, emulated on the CPU, for tests: tests/cuda_emulator.py compiles a kernel source with
// this header in front (its inline PTX rewritten into emu::ptx calls, its 16-byte loads into
// emu::load16's), and links it with the emulator, this header compiled alone with
// EMU_RUNTIME defined; the emulator runs a launch's threads as fibers of one host thread,
// one block after another.
//
// - Warp-wide instructions (mma.sync.aligned, __shfl_xor_sync) take effect once all 32 lanes
//   of the warp reach them, __syncthreads once every thread of the block does; threads that
//   wait for others that never come (diverged lanes) are an error, as is an instruction
//   this file does not know or a vector load that is misaligned or outside the launch's
//   tensors.
// - The mma fragments are laid out as the PTX ISA's "Matrix Fragments" sections give them
//   (mma.m16n8k16 with .bf16, mma.m16n8k32 with .s8), written here from those formulas;
//   products sum in float64 (bf16) or exactly (s8).
// - Shared memory is a function's static: one block runs at a time. Its reads and writes are
//   checked as a GPU's race check does: a thread's access to bytes another thread wrote (or,
//   for a write, read) since the block's last __syncthreads is an error, as is a read of
//   bytes no thread of the block wrote.
// - Each launch keeps a trace of its accesses to its tensors (address, block, thread, kind,
//   bytes), in the order each thread issues them, for tests of the memory traffic and its
//   order: 16-byte loads, L2 prefetches and griddepcontrol.waits, and the kernel's other
//   reads and writes, which the compiler's ThreadSanitizer instrumentation of its code (not
//   the emulator's) reports to the __tsan_* functions at the end. A write the kernel's code
//   makes outside the launch's tensors and its own memory is an error before it is made, as
//   is a read outside those and the library's image (its constants, the built-ins).

#pragma once

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __CUDA_ARCH__ 900

struct uint4 {
  unsigned x, y, z, w;
};
struct dim3 {
  unsigned x = 0, y = 1, z = 1;
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace emu {

// What a trace entry is (tests/cuda_emulator.py's LOAD, STREAMING, PREFETCH, WAIT, READ,
// WRITE): a 16-byte load, one by ld.global.nc, a prefetch, a wait, another read or write
enum Access : uint64_t { LOAD = 0, STREAMING = 1, PREFETCH = 2, WAIT = 3, READ = 4, WRITE = 5 };

// float and bf16/fp16 bits
inline float as_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// An inline-PTX operand: outputs point at their variable (read first where "+"), inputs
// carry their value's bits
struct Operand {
  void* out = nullptr;
  int size = 0;
  uint64_t value = 0;
};

template <char KIND, typename T>
Operand out(T* p, bool read) {
  static_assert(sizeof(T) == (KIND == 'h' ? 2 : KIND == 'l' ? 8 : 4), "operand size");
  Operand o{p, (int)sizeof(T), 0};
  if (read) std::memcpy(&o.value, p, sizeof(T));
  return o;
}

template <char KIND, typename T>
Operand in(T v) {
  Operand o;
  if constexpr (KIND == 'f') {
    o.value = bits_of((float)v);
  } else if constexpr (KIND == 'l') {
    o.value = (uint64_t)(uintptr_t)v;
  } else if constexpr (KIND == 'h') {
    o.value = (uint16_t)v;
  } else {
    static_assert(KIND == 'r', "constraint");
    o.value = (uint32_t)v;
  }
  return o;
}

// What the kernel's code calls of the emulator
void ptx(const char* text, std::initializer_list<Operand> operands);  // an asm statement
uint4 load16(const void* p, Access kind = LOAD);                       // *(const uint4*)p
void syncthreads();
uint32_t shuffle_xor(unsigned mask, uint32_t value, int lane_mask);  // of 32-bit values

// Kernels by name, called with cuLaunchKernel's parameters (pointers to each argument)
using Thunk = void (*)(void**);
void add_kernel(const char* name, Thunk thunk);

// A kernel called with the arguments `params` points at; not instrumented: these reads of
// cuLaunchKernel's parameter array are the emulator's, not the kernel's (which gets its
// arguments by value, as on a GPU)
template <typename... A, size_t... I>
__attribute__((no_sanitize("thread"))) void call(void (*kernel)(A...), void** params,
                                                 std::index_sequence<I...>) {
  kernel(*static_cast<A*>(params[I])...);
}
template <typename... A>
constexpr auto arguments(void (*)(A...)) {
  return std::index_sequence_for<A...>{};
}
template <auto kernel>
__attribute__((no_sanitize("thread"))) void entry(void** params) {
  call(kernel, params, arguments(kernel));
}

}  // namespace emu

inline unsigned __byte_perm(unsigned x, unsigned y, unsigned selector) {
  const uint64_t bytes = (uint64_t)y << 32 | x;  // bytes 0-3 x's, 4-7 y's
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned pick = (selector >> (4 * i)) & 7;  // the byte result byte i takes
    r |= (unsigned)((bytes >> (8 * pick)) & 0xFF) << (8 * i);
  }
  return r;
}
inline float __uint_as_float(unsigned u) { return emu::as_float(u); }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}
inline void __syncthreads() { emu::syncthreads(); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles");
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits = emu::shuffle_xor(mask, bits, lane_mask);
  std::memcpy(&value, &bits, 4);
  return value;
}

#define EMU_KERNEL(name) \
  static const bool emu_registered_##name = (emu::add_kernel(#name, &emu::entry<&name>), true);

#ifdef EMU_RUNTIME  // the emulator, which the kernel's code sees only the declarations of

namespace emu {

[[noreturn]] inline void fail(const std::string& why);

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  unsigned thread = 0;
  bool done = false;
};

struct Warp {
  unsigned arrived = 0;
  unsigned long generation = 0;
  std::string op;         // the warp-wide instruction its lanes are at
  uint32_t words[32][8];  // what each lane gives it
};

// Every access of the last launch: address, block, thread, Access, bytes
inline std::vector<std::array<uint64_t, 5>> trace;

// A byte of shared memory's last write and its reads since: each the phase it was made in
// (phase(), 0 for none) and by which thread (SEVERAL: reads of more than one)
struct Touches {
  uint64_t written = 0, read = 0;
  unsigned writer = 0, reader = 0;
};
constexpr unsigned SEVERAL = ~0u;

struct Launch {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  std::function<void()> body;
  std::string error;
  std::vector<Warp> warps;
  unsigned block_arrived = 0;
  unsigned long block_generation = 0;
  unsigned long events = 0;  // arrivals and exits: a round of the block without one is stuck
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;  // [begin, end) of the tensors
  std::map<uintptr_t, Touches> shared;                   // each byte of shared memory's
};
inline Launch* launch = nullptr;

inline void yield() { swapcontext(&launch->current->context, &launch->scheduler); }

inline void fail(const std::string& why) {
  if (launch->error.empty()) launch->error = why;
  launch->current->done = true;
  yield();  // never resumed
  __builtin_unreachable();
}

// Wait until `count` threads arrived at the barrier (arrived, generation)
inline void arrive(unsigned& arrived, unsigned long& generation, unsigned count) {
  ++launch->events;
  const unsigned long mine = generation;
  if (++arrived == count) {
    arrived = 0;
    ++generation;
    return;
  }
  while (generation == mine) yield();
}

// Lane's `n` words to the warp-wide instruction `op`; every lane's words into `all`
inline void exchange(const std::string& op, const uint32_t* mine, int n, uint32_t (*all)[8]) {
  Warp& warp = launch->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  if (warp.arrived == 0) warp.op = op;
  if (warp.op != op) fail("lanes of warp " + std::to_string(threadIdx.x / 32) + " at '" + op +
                          "' and '" + warp.op + "' at once (diverged)");
  std::memcpy(warp.words[lane], mine, n * sizeof(uint32_t));
  arrive(warp.arrived, warp.generation, 32);
  std::memcpy(all, warp.words, sizeof(warp.words));
  arrive(warp.arrived, warp.generation, 32);  // read by all before any lane writes again
}

inline double bf16(uint32_t half) { return as_float(half << 16); }

// x rounded to the nearest bf16, ties to even (x a float64 or a float32)
inline uint16_t to_bf16(double x) {
  if (std::isnan(x)) return 0x7FC0;
  if (x == 0 || std::isinf(x)) return bits_of((float)x) >> 16;
  const int exponent = std::max(std::ilogb(x), -126);
  const double ulp = std::ldexp(1.0, exponent - 7);  // bf16 keeps 8 significant bits
  const double rounded = std::nearbyint(x / ulp) * ulp;
  if (std::fabs(rounded) > 0x1.FEp127) return x > 0 ? 0x7F80 : 0xFF80;  // past bf16's largest
  return bits_of((float)rounded) >> 16;
}

inline float from_fp16(uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 31, mantissa = h & 1023;
  double v;
  if (exponent == 31) v = mantissa ? NAN : INFINITY;
  else if (exponent == 0) v = std::ldexp((double)mantissa, -24);
  else v = std::ldexp(1024.0 + mantissa, exponent - 25);
  return (float)(sign ? -v : v);
}

// One instruction's arguments: each the operand numbers it names (a {vector} several) or,
// for an immediate, none and the value
struct Argument {
  std::vector<int> operands;
  uint64_t immediate = 0;
};
struct Instruction {
  std::string op;
  std::vector<Argument> args;
};

inline Instruction parse(const char* text) {
  std::string s(text);
  const size_t semicolon = s.find(';');
  if (semicolon == std::string::npos ||
      s.find_first_not_of(" \t\n", semicolon + 1) != std::string::npos)
    fail(std::string("one instruction an asm statement, not: ") + text);
  s = s.substr(0, semicolon);
  const size_t start = s.find_first_not_of(" \t\n");
  const size_t space = std::min(s.find_first_of(" \t\n", start), s.size());
  Instruction ins{s.substr(start, space - start), {}};
  size_t i = space;
  while ((i = s.find_first_not_of(" ,\t\n", i)) != std::string::npos) {
    Argument arg;
    const char open = s[i];  // {a vector} or [an address]
    const bool group = open == '{' || open == '[';
    const size_t end = std::min(s.find(group ? (open == '{' ? '}' : ']') : ',', i), s.size());
    const std::string token = s.substr(i + group, end - i - group);
    for (size_t at = token.find('%'); at != std::string::npos; at = token.find('%', at + 1))
      arg.operands.push_back(std::stoi(token.substr(at + 1)));
    if (arg.operands.empty()) arg.immediate = std::stoull(token, nullptr, 0);
    ins.args.push_back(arg);
    i = end + 1;
  }
  return ins;
}

// An instruction's operands: argument `arg`'s i-th register, read or written
struct Context {
  const Instruction& ins;
  std::vector<Operand>& ops;
  uint32_t r(int arg, int i = 0) const {
    return (uint32_t)ops.at(ins.args.at(arg).operands.at(i)).value;
  }
  uint64_t imm(int arg) const { return ins.args.at(arg).immediate; }
  uintptr_t address(int arg) const {  // an [address] argument's 64-bit register
    return ops.at(ins.args.at(arg).operands.at(0)).value;
  }
  void set(int arg, int i, uint64_t bits) const {
    Operand& o = ops.at(ins.args.at(arg).operands.at(i));
    if (!o.out) fail("writes an input: " + ins.op);
    o.value = bits;
  }
};

// Whether the `bytes` at `address` are all in one of the launch's tensors
inline bool in_tensors(uintptr_t address, uint64_t bytes) {
  for (const auto& [begin, end] : launch->ranges)
    if (address >= begin && address + bytes <= end) return true;
  return false;
}

inline void record(uintptr_t address, Access kind, uint64_t bytes) {
  trace.push_back({address, blockIdx.x, threadIdx.x, kind, bytes});
}

// The 16 bytes at p, read as a kernel's `*(const uint4*)p` reads them (rewritten to this;
// `kind` STREAMING from ld.global.nc): aligned and inside the launch's tensors, as on a
// GPU, where others fault
uint4 load16(const void* p, Access kind) {
  if ((uintptr_t)p % 16) fail("a 16-byte load at an address that is not 16-byte aligned");
  if (!in_tensors((uintptr_t)p, 16))
    fail("a 16-byte load reads outside the launch's tensors");
  record((uintptr_t)p, kind, 16);
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}

// The linker's bounds of the library's image (its own, not the program's) and of its
// zero-initialized statics in it: of what the kernel's code reads and writes, its constants
// and the built-ins (threadIdx, ...), and its shared memory (the emulator's globals in them
// are not instrumented)
extern "C" __attribute__((visibility("hidden"))) char __ehdr_start[], __bss_start[], _end[];

inline bool in_shared(uintptr_t address) {
  return address >= (uintptr_t)__bss_start && address < (uintptr_t)_end;
}

inline bool in_image(uintptr_t address, uint64_t bytes) {
  return address >= (uintptr_t)__ehdr_start && address + bytes <= (uintptr_t)_end;
}

inline bool on_stack(uintptr_t address) {  // the running thread's
  const uintptr_t stack = (uintptr_t)launch->current->stack.data();
  return address >= stack && address < stack + launch->current->stack.size();
}

// The part of the launch a thread is in: its block, and the __syncthreads it passed (never 0)
inline uint64_t phase() { return (uint64_t)(blockIdx.x + 1) << 32 | launch->block_generation; }

inline std::string race(const char* does, const char* did, unsigned other) {
  const std::string who = other == SEVERAL ? "other threads" : "thread " + std::to_string(other);
  return "thread " + std::to_string(threadIdx.x) + " of block " + std::to_string(blockIdx.x) +
         " " + does + " shared memory " + who + " " + did + " since the last __syncthreads";
}

// A read or write of shared memory, against the other threads' since the block's last
// __syncthreads, which alone orders them on a GPU: a read of a byte another thread wrote, or
// a write of one another thread read or wrote, is a race, and a read of a byte no thread of
// the block wrote reads what was there before it (another block's leftovers, on a GPU)
inline void check_shared(uintptr_t address, uint64_t bytes, Access kind) {
  const uint64_t now = phase();
  const unsigned me = threadIdx.x;
  for (uintptr_t at = address; at < address + bytes; ++at) {
    Touches& t = launch->shared[at];
    if (t.written == now && t.writer != me)
      fail(race(kind == READ ? "reads" : "writes", "wrote", t.writer));
    if (kind == READ) {
      if (t.written >> 32 != now >> 32)
        fail("a read of shared memory no thread of its block wrote");
      t.reader = t.read == now && t.reader != me ? SEVERAL : me;
      t.read = now;
    } else {
      if (t.read == now && t.reader != me) fail(race("writes", "read", t.reader));
      t.written = now;
      t.writer = me;
    }
  }
}

// An instrumented read or write of the kernel's code, of `bytes` at `address`: traced where
// it is in a tensor of the launch, checked for races where it is in shared memory. Anything
// else is an error before it is made, but a read or write of the thread's stack and a read
// of the library's image: a write would corrupt memory of someone else's, a read see what a
// GPU's would not (garbage, or a fault where a page ends).
inline void access(uintptr_t address, uint64_t bytes, Access kind) {
  if (!launch || !launch->current) return;  // (the kernels' registration, at load)
  if (in_tensors(address, bytes)) return record(address, kind, bytes);
  if (in_shared(address)) return check_shared(address, bytes, kind);
  if (on_stack(address)) return;
  if (kind == WRITE) fail("a write outside the launch's tensors");
  if (!in_image(address, bytes)) fail("a read outside the launch's tensors");
}

// mma.m16n8k16 with .bf16 (f32 sums, here in float64) and mma.m16n8k32 with .s8 (exact s32
// sums), the PTX ISA's fragments, its formulas for each shape written as one: with g = lane
// >> 2, t = lane % 4 and E = K / 8 elements a 32-bit register, a lane's A element i
// (register r = i / E, its element i % E) is at row g + 8 (r % 2), column E t + i % E +
// K / 2 (r / 2); its B element i at row E t + i % E + K / 2 (i / E), column g; its C/D
// element i at row g + 8 (i / 2), column 2t + i % 2.
template <int K>
inline void mma(const Context& c) {
  constexpr int E = K / 8;
  using Value = std::conditional_t<K == 16, double, int64_t>;
  const auto element = [](uint32_t reg, int j) -> Value {
    if constexpr (K == 16) return bf16((reg >> (16 * j)) & 0xFFFF);
    else return (int8_t)((reg >> (8 * j)) & 0xFF);
  };
  const uint32_t mine[6] = {c.r(1, 0), c.r(1, 1), c.r(1, 2), c.r(1, 3), c.r(2, 0), c.r(2, 1)};
  uint32_t all[32][8];
  exchange(c.ins.op, mine, 6, all);
  Value a[16][K], b[K][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4 * E; ++i) {
      const int r = i / E;
      a[g + 8 * (r % 2)][E * t + i % E + K / 2 * (r / 2)] = element(all[lane][r], i % E);
    }
    for (int i = 0; i < 2 * E; ++i) {
      const int r = i / E;
      b[E * t + i % E + K / 2 * r][g] = element(all[lane][4 + r], i % E);
    }
  }
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    Value sum;
    if constexpr (K == 16) sum = as_float(c.r(3, i));
    else sum = (int32_t)c.r(3, i);
    for (int k = 0; k < K; ++k) sum += a[row][k] * b[k][col];
    if constexpr (K == 16) c.set(0, i, bits_of((float)sum));
    else c.set(0, i, (uint32_t)(int32_t)sum);
  }
}

inline void execute(const Instruction& ins, std::vector<Operand>& ops) {
  const Context c{ins, ops};
  const std::string& op = ins.op;
  if (op == "lop3.b32") {  // each bit: the immediate's bit at (a << 2 | b << 1 | c)
    const uint32_t a = c.r(1), b = c.r(2), cc = c.r(3), lut = (uint32_t)c.imm(4);
    uint32_t d = 0;
    for (int bit = 0; bit < 32; ++bit) {
      const int index = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((cc >> bit) & 1);
      d |= ((lut >> index) & 1u) << bit;
    }
    c.set(0, 0, d);
  } else if (op == "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") {
    mma<16>(c);
  } else if (op == "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32") {
    mma<32>(c);
  } else if (op == "cvt.rn.bf16.f32") {
    c.set(0, 0, to_bf16(as_float(c.r(1))));
  } else if (op == "cvt.f32.f16") {
    c.set(0, 0, bits_of(from_fp16((uint16_t)c.r(1))));
  } else if (op == "cvt.rn.bf16x2.f32") {  // a into the upper half, b the lower
    c.set(0, 0, (uint32_t)to_bf16(as_float(c.r(1))) << 16 | to_bf16(as_float(c.r(2))));
  } else if (op == "fma.rn.bf16x2") {  // each half a * b + c, rounded once
    uint32_t d = 0;
    for (int h = 0; h < 2; ++h) {
      const auto half = [&](int arg) { return (c.r(arg) >> (16 * h)) & 0xFFFF; };
      d |= (uint32_t)to_bf16(bf16(half(1)) * bf16(half(2)) + bf16(half(3))) << (16 * h);
    }
    c.set(0, 0, d);
  } else if (op == "ld.global.nc.L1::no_allocate.v4.u32") {
    const uint4 v = load16((const void*)c.address(1), STREAMING);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
    for (int i = 0; i < 4; ++i) c.set(0, i, words[i]);
  } else if (op == "prefetch.global.L2::evict_last") {  // traced; no effect on the values
    record(c.address(0), PREFETCH, 0);
  } else if (op == "griddepcontrol.wait") {  // traced (address 0); returns at once here
    record(0, WAIT, 0);
  } else if (op == "griddepcontrol.launch_dependents") {
    // no effect on what a kernel computes
  } else {
    fail("the emulator does not know the instruction " + op);
  }
}

// An asm statement: its text, then its output operands, then its inputs (as numbered)
void ptx(const char* text, std::initializer_list<Operand> operands) {
  static std::map<const char*, Instruction> parsed;
  auto it = parsed.find(text);
  if (it == parsed.end()) it = parsed.emplace(text, parse(text)).first;
  std::vector<Operand> ops(operands);
  execute(it->second, ops);
  for (Operand& o : ops)
    if (o.out) std::memcpy(o.out, &o.value, o.size);
}

// The block's threads have all reached it
void syncthreads() {
  arrive(launch->block_arrived, launch->block_generation, blockDim.x);
}

uint32_t shuffle_xor(unsigned mask, uint32_t value, int lane_mask) {
  if (mask != 0xFFFFFFFFu) fail("a shuffle of only some lanes");
  if (lane_mask < 0 || lane_mask > 31) fail("a shuffle with a lane mask past the warp");
  uint32_t all[32][8];
  exchange("shfl.sync.bfly", &value, 1, all);
  return all[(threadIdx.x & 31) ^ lane_mask][0];
}

inline std::map<std::string, Thunk>& kernels() {  // by name
  static std::map<std::string, Thunk> all;
  return all;
}

void add_kernel(const char* name, Thunk thunk) { kernels()[name] = thunk; }

inline void fiber_main() {
  launch->body();
  launch->current->done = true;
  ++launch->events;
}

// Runs the block blockIdx.x's threads to their ends (false: an error, in launch->error)
inline bool run_block() {
  for (unsigned i = 0; i < blockDim.x; ++i) {
    Fiber& f = launch->fibers[i];
    f.thread = i;
    f.done = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &launch->scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  for (unsigned left = blockDim.x; left;) {
    const unsigned long events = launch->events;
    for (Fiber& f : launch->fibers) {
      if (f.done) continue;
      launch->current = &f;
      threadIdx.x = f.thread;
      swapcontext(&launch->scheduler, &f.context);
      if (!launch->error.empty()) return false;
      left -= f.done;
    }
    if (left && launch->events == events) {
      launch->error = "threads wait at a barrier or warp-wide instruction that others never "
                      "reach (block " + std::to_string(blockIdx.x) + ")";
      return false;
    }
  }
  return true;
}

}  // namespace emu

// What the kernel's code, built with -fsanitize=thread (cuda_emulator.py's TRACED), calls:
// each read or write of n bytes, aligned or not
#define EMU_ACCESSES(n)                                                                     \
  extern "C" void __tsan_read##n(uintptr_t a) { emu::access(a, n, emu::READ); }            \
  extern "C" void __tsan_write##n(uintptr_t a) { emu::access(a, n, emu::WRITE); }          \
  extern "C" void __tsan_unaligned_read##n(uintptr_t a) { emu::access(a, n, emu::READ); }  \
  extern "C" void __tsan_unaligned_write##n(uintptr_t a) { emu::access(a, n, emu::WRITE); }
EMU_ACCESSES(1)
EMU_ACCESSES(2)
EMU_ACCESSES(4)
EMU_ACCESSES(8)
EMU_ACCESSES(16)
extern "C" void __tsan_read_range(uintptr_t a, size_t n) { emu::access(a, n, emu::READ); }
extern "C" void __tsan_write_range(uintptr_t a, size_t n) { emu::access(a, n, emu::WRITE); }
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))  // (the rest is hidden)

// The launch of kernel `name` on `grid` blocks of `block` threads; `ranges`: (address, bytes)
// pairs of the tensors it may read and write. nullptr, or why it failed.
EMU_EXPORT const char* emu_launch(const char* name, unsigned grid, unsigned block, void** params,
                                  const uint64_t* ranges, int count) {
  static std::string error;
  auto kernel = emu::kernels().find(name);
  if (kernel == emu::kernels().end()) return (error = std::string("no kernel ") + name).c_str();
  emu::Launch state;
  state.body = [&] { kernel->second(params); };
  state.fibers.resize(block);
  for (emu::Fiber& f : state.fibers) f.stack.resize(64 * 1024);
  state.warps.resize((block + 31) / 32);
  for (int i = 0; i < count; ++i)
    state.ranges.push_back({ranges[2 * i], ranges[2 * i] + ranges[2 * i + 1]});
  emu::launch = &state;
  emu::trace.clear();
  blockDim.x = block;
  gridDim.x = grid;
  bool ok = true;
  for (unsigned b = 0; b < grid && ok; ++b) {
    blockIdx.x = b;
    ok = emu::run_block();
  }
  emu::launch = nullptr;
  if (ok) return nullptr;
  error = state.error;
  return error.c_str();
}

// The last launch's trace (emu::trace): its entries at *entries (5 words each), how many
// returned
EMU_EXPORT size_t emu_trace(const uint64_t** entries) {
  *entries = emu::trace.empty() ? nullptr : emu::trace.front().data();
  return emu::trace.size();
}

#endif  // EMU_RUNTIME
