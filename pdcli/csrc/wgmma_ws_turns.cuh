// The compute side of the warp-specialised prefill kernel (prefill_attention_sm90_ws.cu): its shared-memory ring
// and the two compute warpgroups' loops. Each warpgroup owns 64 of the CTA's 128 query rows and takes turns with
// the other on the tensor cores (named barriers 1 and 2; warpgroup 1 arrives on 1 first). pingpong_turns: a turn
// issues one GEMM, and a warpgroup's softmax runs under the other's GEMM; overlapped_turns (FA3's intra-warpgroup
// overlap): a turn issues tile n's QK and tile n - 1's PV GEMM, and tile n's softmax runs under the latter too.
#pragma once
#include <stdint.h>

#include "wgmma.cuh"
#include "wgmma_softmax.cuh"

namespace pdcli {

// Q, then S stages of (K, V) tiles of 128 rows x 128 values (two 128-byte swizzled halves each), then mbarriers.
template <int S>
struct WsRing {
  static constexpr int kTileBytes = 128 * 128 * 2;
  static constexpr int kHalfBytes = kTileBytes / 2;
  uint32_t q;  // 1024-byte aligned: swizzle atoms are
  __device__ uint32_t k(int st) const { return q + (1 + 2 * st) * kTileBytes; }
  __device__ uint32_t v(int st) const { return q + (2 + 2 * st) * kTileBytes; }
  __device__ uint32_t bar(int i) const { return q + (1 + 2 * S) * kTileBytes + 8 * i; }
  // full / empty: the stage's tile (split: its K) landed / both compute warpgroups are done with it; split: V's own
  __device__ uint32_t full(int st) const { return bar(st); }
  __device__ uint32_t empty(int st) const { return bar(S + st); }
  __device__ uint32_t full_v(int st) const { return bar(2 * S + st); }
  __device__ uint32_t empty_v(int st) const { return bar(3 * S + st); }
  __device__ uint32_t q_full() const { return bar(4 * S); }
  static constexpr int kBytes = (1 + 2 * S) * kTileBytes + 8 * (4 * S + 1);
};

// One compute warpgroup's loop parameters.
struct WsTurns {
  int cw;                        // 0 or 1: rows [64 cw, 64 cw + 64) of the tile
  int n_tiles, n_unmasked;       // key tiles; those before n_unmasked need no causal mask
  int mask_limit;                // the last visible key of row lane / 4 in tile 0, relative to column 2 (lane % 4)
  float scale_log2;              // softmax scale * log2(e)
  uint32_t k_sbo, v_lbo, v_sbo;  // descriptor strides, bytes
};

// kSplit: K and V on barriers of their own (K released once the QK GEMM is done) and warpgroup 1 waits on none: its
// turn comes after warpgroup 0 issued on the tile (FA3's order); else one barrier pair a stage.
template <typename T, int S, bool kSplit>
__device__ __forceinline__ void pingpong_turns(const WsRing<S>& r, const WsTurns& a, float (&o)[64], float (&s)[64],
                                               SoftmaxState& st) {
  const int cw = a.cw;
  for (int n = 0; n < a.n_tiles; ++n) {
    const int stage = n % S;
    if (!kSplit || cw == 0) mbar_wait(r.full(stage), (n / S) & 1);
    named_sync(1 + cw);  // my turn for the tensor cores
    issue_qk<T>(s, r.q + cw * 64 * 128, r.k(stage), WsRing<S>::kHalfBytes, a.k_sbo);
    named_arrive(1 + (cw ^ 1));  // the other's turn
    wait_acc(s);
    if constexpr (kSplit) mbar_arrive(r.empty(stage));
    if (n >= a.n_unmasked) mask_causal(s, a.mask_limit - n * 128);
    softmax_tile(s, o, st, a.scale_log2);
    uint32_t pa[8][4];
    pack_p<T>(s, pa, o);
    if (kSplit && cw == 0) mbar_wait(r.full_v(stage), (n / S) & 1);
    named_sync(1 + cw);
    issue_pv<T>(o, pa, r.v(stage), a.v_lbo, a.v_sbo);
    if (cw == 0 || n + 1 < a.n_tiles) named_arrive(1 + (cw ^ 1));  // warpgroup 1's last turn goes to no one
    wait_acc(o);
    mbar_arrive(kSplit ? r.empty_v(stage) : r.empty(stage));
  }
}

// K and V on barriers of their own. A PV GEMM's wait sits at the top of the next step, after the ring's spin-wait
// (ptxas hoists a wgmma wait to the top of its basic block), so the softmax stays under it. n_tiles + 1 turns: QK
// alone first, PV alone last.
template <typename T, int S>
__device__ __forceinline__ void overlapped_turns(const WsRing<S>& r, const WsTurns& a, float (&o)[64], float (&s)[64],
                                                 SoftmaxState& st) {
  const int cw = a.cw, n_tiles = a.n_tiles;
  const uint32_t q_rows = r.q + cw * 64 * 128;
  uint32_t pa[8][4];
  float corr[2];
  mbar_wait(r.full(0), 0);
  named_sync(1 + cw);
  issue_qk<T>(s, q_rows, r.k(0), WsRing<S>::kHalfBytes, a.k_sbo);
  named_arrive(1 + (cw ^ 1));
  wait_acc(s);
  mbar_arrive(r.empty(0));
  if (a.n_unmasked == 0) mask_causal(s, a.mask_limit);
  softmax_scores(s, st, a.scale_log2, corr);
  for (int n = 1; n < n_tiles; ++n) {
    const int stage = n % S, prev = (n - 1) % S;
    mbar_wait(r.full(stage), (n / S) & 1);
    wait_acc(o);  // tile n - 2's PV
    if (n >= 2) mbar_arrive(r.empty_v((n - 2) % S));
    pack_p<T>(s, pa, o);
    mbar_wait(r.full_v(prev), ((n - 1) / S) & 1);
    named_sync(1 + cw);
    issue_qk<T>(s, q_rows, r.k(stage), WsRing<S>::kHalfBytes, a.k_sbo);
    rescale_o(o, corr);
    issue_pv<T>(o, pa, r.v(prev), a.v_lbo, a.v_sbo);
    named_arrive(1 + (cw ^ 1));
    wait_acc<1>(s);  // tile n's QK; the PV GEMM runs on
    mbar_arrive(r.empty(stage));
    if (n >= a.n_unmasked) mask_causal(s, a.mask_limit - n * 128);
    softmax_scores(s, st, a.scale_log2, corr);
  }
  const int last = (n_tiles - 1) % S;
  wait_acc(o);
  if (n_tiles >= 2) mbar_arrive(r.empty_v((n_tiles - 2) % S));
  pack_p<T>(s, pa, o);
  mbar_wait(r.full_v(last), ((n_tiles - 1) / S) & 1);
  named_sync(1 + cw);
  rescale_o(o, corr);
  issue_pv<T>(o, pa, r.v(last), a.v_lbo, a.v_sbo);
  if (cw == 0) named_arrive(2);  // warpgroup 1's last turn goes to no one
  wait_acc(o);
  mbar_arrive(r.empty_v(last));
}

}  // namespace pdcli
