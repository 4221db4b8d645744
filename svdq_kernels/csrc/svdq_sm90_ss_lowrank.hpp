// svdquant: FP8 x FP8 shared-memory-sourced mainloop with low-rank k-tiles for sm_90a, derived from
// CUTLASS 4.2's sm90_mma_tma_gmma_ss_warpspecialized.hpp. The original license of that file follows.
/***************************************************************************************************
 * Copyright (c) 2023 - 2025 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Redistribution and use in source and binary forms, with or without
 * modification, are permitted provided that the following conditions are met:
 *
 * 1. Redistributions of source code must retain the above copyright notice, this
 * list of conditions and the following disclaimer.
 *
 * 2. Redistributions in binary form must reproduce the above copyright notice,
 * this list of conditions and the following disclaimer in the documentation
 * and/or other materials provided with the distribution.
 *
 * 3. Neither the name of the copyright holder nor the names of its
 * contributors may be used to endorse or promote products derived from
 * this software without specific prior written permission.
 *
 * THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
 * AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
 * IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
 * DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
 * FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
 * DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
 * SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
 * CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
 * OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
 * OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
 *
 **************************************************************************************************/
#pragma once

#include "cutlass/cutlass.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/pipeline/pipeline.hpp"
#include "cutlass/trace.h"

#include "cute/arch/cluster_sm90.hpp"
#include "cute/arch/copy_sm90.hpp"
#include "cute/algorithm/functional.hpp"
#include "cute/atom/mma_atom.hpp"
#include "cute/algorithm/gemm.hpp"
#include "cute/numeric/arithmetic_tuple.hpp"

/////////////////////////////////////////////////////////////////////////////////////////////////

namespace cutlass::gemm::collective {
using namespace cute;

/////////////////////////////////////////////////////////////////////////////////////////////////

// svdq: the stock SS warp-specialized mainloop (both operands from shared memory, the FP8 MMAs
// accumulating straight into the fp32 accumulator: no promotion) for the fast8 layer with
// pre-converted e4m3 weights, plus low-rank k-tiles. Differences from CUTLASS 4.2's
// sm90_mma_tma_gmma_ss_warpspecialized.hpp, all marked "svdq:":
//  * a standalone class (not a CollectiveMma specialization) so it lives beside the stock one;
//  * the problem's K is the weights' K plus lr_k_tiles low-rank k-tiles of TileK bytes per row:
//    for such a k-tile the producer TMA-loads L1 (A: TileM x 64 bf16, the same bytes and 128-byte
//    swizzle as a TileM x 128 e4m3 tile) and lr (B: TileN x 64 bf16) into the stage's buffers,
//    and the consumer issues two bf16 SS wgmmas (K = 16 each: only the first 32 columns hold
//    ranks, the other 32 are zeros) into the same accumulator instead of the four FP8 ones;
//  * a low-rank k-tile is recognised by its k-tile index (>= the weights' K / TileK): the producer
//    writes each k-tile's index into a ring of 2 x Stages ints in shared memory before the stage's
//    arrive (release), the consumer reads it after its wait (acquire) — so any stream-K split works;
//  * the k-loop issues each k-tile's wgmmas per k-block, each branch arriving and committing its own
//    batch (one commit after the branches' join makes the compiler add a dummy wgmma).
// Pipeline, TMA, warp specialization and the accumulator are the stock code's.
template <
  class DispatchPolicy_,
  class TileShape_,
  class ElementA_,
  class StrideA_,
  class ElementB_,
  class StrideB_,
  class TiledMma_,
  class GmemTiledCopyA_,
  class SmemLayoutAtomA_,
  class SmemCopyAtomA_,
  class TransformA_,
  class GmemTiledCopyB_,
  class SmemLayoutAtomB_,
  class SmemCopyAtomB_,
  class TransformB_>
struct SvdqSm90SsLowRankMma
{
  //
  // Type Aliases
  //
  using DispatchPolicy = DispatchPolicy_;  // svdq: MainloopSm90TmaGmmaWarpSpecialized<Stages, ClusterShape, KernelSchedule>
  static constexpr int Stages = DispatchPolicy::Stages;
  using ClusterShape = typename DispatchPolicy::ClusterShape;
  using KernelSchedule = typename DispatchPolicy::Schedule;
  using TileShape = TileShape_;
  using ElementA = ElementA_;
  using StrideA = StrideA_;
  using ElementB = ElementB_;
  using StrideB = StrideB_;
  using TiledMma = TiledMma_;
  using ElementAccumulator = typename TiledMma::ValTypeC;
  using GmemTiledCopyA = GmemTiledCopyA_;
  using GmemTiledCopyB = GmemTiledCopyB_;
  using SmemLayoutAtomA = SmemLayoutAtomA_;
  using SmemLayoutAtomB = SmemLayoutAtomB_;
  using SmemCopyAtomA = SmemCopyAtomA_;
  using SmemCopyAtomB = SmemCopyAtomB_;
  using TransformA = TransformA_;
  using TransformB = TransformB_;
  using ArchTag = typename DispatchPolicy::ArchTag;

  using CtaShape_MNK = decltype(shape_div(TileShape{}, ClusterShape{}));
  using MainloopPipeline = cutlass::PipelineTmaAsync<DispatchPolicy::Stages>;
  using PipelineState = cutlass::PipelineState<DispatchPolicy::Stages>;

  using PipelineParams = typename MainloopPipeline::Params;

  // One threads per CTA are producers (1 for operand tile)
  static constexpr int NumProducerThreadEvents = 1;

  static_assert(cute::rank(SmemLayoutAtomA{}) == 2, "SmemLayoutAtom must be rank 2 (M/N, K)");
  static_assert((size<0>(TileShape{}) % size<0>(SmemLayoutAtomA{})) == 0, "SmemLayoutAtom must evenly divide tile shape.");
  static_assert((size<2>(TileShape{}) % size<1>(SmemLayoutAtomA{})) == 0, "SmemLayoutAtom must evenly divide tile shape.");

  static_assert(cute::rank(SmemLayoutAtomB{}) == 2, "SmemLayoutAtom must be rank 2 (M/N, K)");
  static_assert((size<1>(TileShape{}) % size<0>(SmemLayoutAtomB{})) == 0, "SmemLayoutAtom must evenly divide tile shape.");
  static_assert((size<2>(TileShape{}) % size<1>(SmemLayoutAtomB{})) == 0, "SmemLayoutAtom must evenly divide tile shape.");

  // Tile along modes in a way that maximizes the TMA box size.
  using SmemLayoutA = decltype(tile_to_shape(
      SmemLayoutAtomA{},
      make_shape(shape<0>(TileShape{}), shape<2>(TileShape{}), Int<DispatchPolicy::Stages>{}),
      cute::conditional_t< ::cutlass::gemm::detail::is_major<0,StrideA>(), Step<_2,_1,_3>, Step<_1,_2,_3>>{}));
  using SmemLayoutB = decltype(tile_to_shape(
      SmemLayoutAtomB{},
      make_shape(shape<1>(TileShape{}), shape<2>(TileShape{}), Int<DispatchPolicy::Stages>{}),
      cute::conditional_t< ::cutlass::gemm::detail::is_major<0,StrideB>(), Step<_2,_1,_3>, Step<_1,_2,_3>>{}));

  static_assert(DispatchPolicy::Stages >= 2, "Specialization requires Stages set to value 2 or more.");
  static_assert(cute::is_base_of<cute::GMMA::DescriptorIterator, typename TiledMma::FrgTypeA>::value &&
                cute::is_base_of<cute::GMMA::DescriptorIterator, typename TiledMma::FrgTypeB>::value,
                "MMA atom must source both A and B operand from smem_desc for this mainloop.");
  static_assert(cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD> || cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>,
      "GmemTiledCopy - invalid SM90 TMA copy atom specified.");
  static_assert(cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD> || cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>,
      "GmemTiledCopy - invalid SM90 TMA copy atom specified.");

  // TMA converts f32 input to tf32 when copying from GMEM to SMEM
  // For all other types, cast to size equivalent uint type to avoid any rounding by TMA.
  static constexpr bool ConvertF32toTF32A = cute::is_same_v<float, ElementA>;
  static constexpr bool ConvertF32toTF32B = cute::is_same_v<float, ElementB>;
  using InternalElementA = cute::conditional_t<ConvertF32toTF32A, tfloat32_t, uint_bit_t<sizeof_bits_v<ElementA>>>;
  using InternalElementB = cute::conditional_t<ConvertF32toTF32B, tfloat32_t, uint_bit_t<sizeof_bits_v<ElementB>>>;

  // svdq: the low-rank k-tiles, bf16 views of the stage buffers: a k-tile of TileK bytes per row
  // holds 64 bf16, ranks 32j..32j+31 of k-tile j in its first 32 columns (the rest zeros).
  using ElementLR = cutlass::bfloat16_t;
  static constexpr int LrKB = 64;                  // bf16 columns per low-rank k-tile (L1 and lr)
  static constexpr int LrK = 32;                   // of which ranks
  static constexpr int LrKBlocks = LrK / 16;       // bf16 wgmmas (K = 16) per low-rank k-tile
  using LrTileShape = Shape<decltype(shape<0>(TileShape{})), decltype(shape<1>(TileShape{})), Int<LrKB>>;
  using SmemLayoutALR = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<ElementLR>{},
      make_shape(shape<0>(TileShape{}), Int<LrKB>{}, Int<Stages>{})));
  using SmemLayoutBLR = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<ElementLR>{},
      make_shape(shape<1>(TileShape{}), Int<LrKB>{}, Int<Stages>{})));
  using TiledMmaLR = decltype(make_tiled_mma(
      GMMA::ss_op_selector<ElementLR, ElementLR, float, LrTileShape, GMMA::Major::K, GMMA::Major::K>(),
      Layout<Shape<Int<size(TiledMma{}) / NumThreadsPerWarpGroup>, _1, _1>>{}));
  static_assert(sizeof_bits_v<ElementA> == 8 && sizeof_bits_v<ElementB> == 8 && size<2>(TileShape{}) == 128,
                "svdq: the low-rank k-tiles need 8-bit operands and TileK = 128");
  static_assert(::cutlass::gemm::detail::is_k_major<StrideA>() && ::cutlass::gemm::detail::is_k_major<StrideB>(),
                "svdq: the low-rank k-tiles need K-major operands");
  static_assert(size(TiledMmaLR{}) == size(TiledMma{}), "svdq: one thread layout for both MMAs");
  // a low-rank k-tile's bf16 tiles fill exactly the stage buffers they are written into, same swizzle
  static_assert(cute::cosize_v<SmemLayoutALR> * 2 == cute::cosize_v<SmemLayoutA>, "svdq: L1's bf16 tile must have the bytes of the A tile");
  static_assert(cute::cosize_v<SmemLayoutBLR> * 2 == cute::cosize_v<SmemLayoutB>, "svdq: lr's bf16 tile must have the bytes of the B tile");
  static_assert(cute::is_same_v<SmemLayoutAtomA, GMMA::Layout_K_SW128_Atom<ElementA>> &&
                cute::is_same_v<SmemLayoutAtomB, GMMA::Layout_K_SW128_Atom<ElementB>>,
                "svdq: the low-rank k-tiles reuse the operands' 128-byte swizzle");
  // svdq: the k-tile index ring (see the class comment): 2 x Stages slots, so the producer never
  // overwrites an index the consumers have not read (they read k-tile c's before releasing c - 1).
  static constexpr int KTileRing = 2 * Stages;

  struct SharedStorage
  {
    struct TensorStorage : cute::aligned_struct<128, _0> {
      cute::array_aligned<typename TiledMma::ValTypeA, cute::cosize_v<SmemLayoutA>> smem_A;
      cute::array_aligned<typename TiledMma::ValTypeB, cute::cosize_v<SmemLayoutB>> smem_B;
      cute::array_aligned<int32_t, KTileRing> k_tile_index;  // svdq: the index ring
    } tensors;

    using PipelineStorage = typename MainloopPipeline::SharedStorage;
    PipelineStorage pipeline;
  };
  using TensorStorage = typename SharedStorage::TensorStorage;
  using PipelineStorage = typename SharedStorage::PipelineStorage;

  // Host side kernel arguments
  struct Arguments {
    ElementA const* ptr_A;
    StrideA dA;
    ElementB const* ptr_B;
    StrideB dB;
    uint32_t mma_promotion_interval = 4;
    // svdq: lr: [tokens, 64 * lr_k_tiles] bf16; L1: [N, 64 * lr_k_tiles] bf16; row-major with
    // the given leading dimensions (k-tile j reads columns 64j..64j+63 of both).
    ElementLR const* ptr_LR = nullptr;
    int64_t ld_LR = 0;
    ElementLR const* ptr_L1 = nullptr;
    int64_t ld_L1 = 0;
    int lr_k_tiles = 0;
  };

  // Device side kernel params
  struct Params {
    // Assumption: StrideA is congruent with Problem_MK
    using TMA_A = decltype(make_tma_copy_A_sm90(
        GmemTiledCopyA{},
        make_tensor(static_cast<InternalElementA const*>(nullptr), repeat_like(StrideA{}, int32_t(0)), StrideA{}),
        SmemLayoutA{}(_,_,cute::Int<0>{}),
        TileShape{},
        ClusterShape{}));
    // Assumption: StrideB is congruent with Problem_NK
    using TMA_B = decltype(make_tma_copy_B_sm90(
        GmemTiledCopyB{},
        make_tensor(static_cast<InternalElementB const*>(nullptr), repeat_like(StrideB{}, int32_t(0)), StrideB{}),
        SmemLayoutB{}(_,_,cute::Int<0>{}),
        TileShape{},
        ClusterShape{}));
    // svdq: the low-rank k-tiles' loads: L1 like A, lr like B
    using TMA_L1 = decltype(make_tma_copy_A_sm90<uint16_t>(
        GmemTiledCopyA{},
        make_tensor(static_cast<ElementLR const*>(nullptr), repeat_like(StrideA{}, int32_t(0)), StrideA{}),
        SmemLayoutALR{}(_,_,cute::Int<0>{}),
        LrTileShape{},
        ClusterShape{}));
    using TMA_LR = decltype(make_tma_copy_B_sm90<uint16_t>(
        GmemTiledCopyB{},
        make_tensor(static_cast<ElementLR const*>(nullptr), repeat_like(StrideB{}, int32_t(0)), StrideB{}),
        SmemLayoutBLR{}(_,_,cute::Int<0>{}),
        LrTileShape{},
        ClusterShape{}));
    TMA_A tma_load_a;
    TMA_B tma_load_b;
    uint32_t tma_transaction_bytes = TmaTransactionBytes;
    uint32_t tma_transaction_bytes_mk = TmaTransactionBytesMK;
    uint32_t tma_transaction_bytes_nk = TmaTransactionBytesNK;
    TMA_L1 tma_load_l1;  // svdq
    TMA_LR tma_load_lr;  // svdq
    int k_tiles_real = 0;  // svdq: the weights' K / TileK: k-tiles from here on are low-rank ones
    int lr_k_tiles = 0;    // svdq
  };

  //
  // Methods
  //

  template <class ProblemShape>
  static constexpr Params
  to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void* workspace) {
    (void) workspace;

    // Optionally append 1s until problem shape is rank-4 (MNKL), in case it is only rank-3 (MNK)
    auto problem_shape_MNKL = append<4>(problem_shape, 1);
    auto [M,N,K,L] = problem_shape_MNKL;

    auto ptr_A = reinterpret_cast<InternalElementA const*>(args.ptr_A);
    auto ptr_B = reinterpret_cast<InternalElementB const*>(args.ptr_B);

    // svdq: K counts lr_k_tiles low-rank k-tiles after the weights' own K
    int const K_real = static_cast<int>(K) - args.lr_k_tiles * static_cast<int>(size<2>(TileShape{}));
    Tensor tensor_a = make_tensor(ptr_A, make_layout(make_shape(M,K_real,L), args.dA));
    Tensor tensor_b = make_tensor(ptr_B, make_layout(make_shape(N,K_real,L), args.dB));
    int const lr_cols = args.lr_k_tiles * LrKB;
    Tensor tensor_l1 = make_tensor(args.ptr_L1, make_layout(make_shape(M,lr_cols,L), StrideA{args.ld_L1, _1{}, int64_t(0)}));
    Tensor tensor_lr = make_tensor(args.ptr_LR, make_layout(make_shape(N,lr_cols,L), StrideB{args.ld_LR, _1{}, int64_t(0)}));

    typename Params::TMA_A tma_load_a = make_tma_copy_A_sm90(
        GmemTiledCopyA{},
        tensor_a,
        SmemLayoutA{}(_,_,cute::Int<0>{}),
        TileShape{},
        ClusterShape{});
    typename Params::TMA_B tma_load_b = make_tma_copy_B_sm90(
        GmemTiledCopyB{},
        tensor_b,
        SmemLayoutB{}(_,_,cute::Int<0>{}),
        TileShape{},
        ClusterShape{});
    typename Params::TMA_L1 tma_load_l1 = make_tma_copy_A_sm90<uint16_t>(
        GmemTiledCopyA{}, tensor_l1, SmemLayoutALR{}(_,_,cute::Int<0>{}), LrTileShape{}, ClusterShape{});
    typename Params::TMA_LR tma_load_lr = make_tma_copy_B_sm90<uint16_t>(
        GmemTiledCopyB{}, tensor_lr, SmemLayoutBLR{}(_,_,cute::Int<0>{}), LrTileShape{}, ClusterShape{});
    uint32_t transaction_bytes_mk = TmaTransactionBytesMK;
    uint32_t transaction_bytes_nk = TmaTransactionBytesNK;
    uint32_t transaction_bytes = transaction_bytes_mk + transaction_bytes_nk;

    return {
      tma_load_a,
      tma_load_b,
      transaction_bytes,
      transaction_bytes_mk,
      transaction_bytes_nk,
      tma_load_l1,
      tma_load_lr,
      K_real / static_cast<int>(size<2>(TileShape{})),
      args.lr_k_tiles
    };
  }

  template<class ProblemShape>
  static bool
  can_implement(
      ProblemShape const& problem_shape,
      [[maybe_unused]] Arguments const& args) {
    constexpr int tma_alignment_bits = 128;
    auto problem_shape_MNKL = append<4>(problem_shape, 1);
    auto [M,N,K,L] = problem_shape_MNKL;

    bool implementable = true;
    constexpr int min_tma_aligned_elements_A = tma_alignment_bits / cutlass::sizeof_bits<ElementA>::value;
    implementable = implementable && cutlass::detail::check_alignment<min_tma_aligned_elements_A>(cute::make_shape(M,K,L), StrideA{});
    constexpr int min_tma_aligned_elements_B = tma_alignment_bits / cutlass::sizeof_bits<ElementB>::value;
    implementable = implementable && cutlass::detail::check_alignment<min_tma_aligned_elements_B>(cute::make_shape(N,K,L), StrideB{});

    if (!implementable) {
      CUTLASS_TRACE_HOST("  CAN IMPLEMENT: Problem Size doesn't meet the minimum alignment requirements for TMA.\n");
    }
    // svdq: whole k-tiles, at least one of the weights', and the low-rank operands' rows 16-byte aligned
    int const k_tile = static_cast<int>(size<2>(TileShape{}));
    bool const lowrank_ok = args.lr_k_tiles >= 0 && K % k_tile == 0 && K > args.lr_k_tiles * k_tile &&
        (args.lr_k_tiles == 0 || (args.ptr_L1 != nullptr && args.ptr_LR != nullptr &&
                                  args.ld_L1 % 8 == 0 && args.ld_LR % 8 == 0 &&
                                  args.ld_L1 >= args.lr_k_tiles * LrKB && args.ld_LR >= args.lr_k_tiles * LrKB));
    if (!lowrank_ok) {
      CUTLASS_TRACE_HOST("  CAN IMPLEMENT: svdq: K is not whole k-tiles or the low-rank operands are invalid.\n");
    }
    return implementable && lowrank_ok;
  }

  static constexpr int K_PIPE_MAX = DispatchPolicy::Stages;
  static constexpr int K_PIPE_MMAS = 1;
  static constexpr uint32_t TmaTransactionBytesMK =
        cutlass::bits_to_bytes(size<0>(SmemLayoutA{}) * size<1>(SmemLayoutA{}) * static_cast<uint32_t>(sizeof_bits<ElementA>::value));
  static constexpr uint32_t TmaTransactionBytesNK =
        cutlass::bits_to_bytes(size<0>(SmemLayoutB{}) * size<1>(SmemLayoutB{}) * static_cast<uint32_t>(sizeof_bits<ElementB>::value));
  static constexpr uint32_t TmaTransactionBytes = TmaTransactionBytesMK + TmaTransactionBytesNK;
  // svdq: a low-rank k-tile arrives with the same bytes as an FP8 one
  static_assert(size<0>(TileShape{}) * LrKB * 2 == TmaTransactionBytesMK &&
                size<1>(TileShape{}) * LrKB * 2 == TmaTransactionBytesNK, "svdq: low-rank k-tile bytes differ");

  /// Issue Tma Descriptor Prefetch -- ideally from a single thread for best performance
  CUTLASS_DEVICE
  static void prefetch_tma_descriptors(Params const& mainloop_params) {
    cute::prefetch_tma_descriptor(mainloop_params.tma_load_a.get_tma_descriptor());
    cute::prefetch_tma_descriptor(mainloop_params.tma_load_b.get_tma_descriptor());
    cute::prefetch_tma_descriptor(mainloop_params.tma_load_l1.get_tma_descriptor());  // svdq
    cute::prefetch_tma_descriptor(mainloop_params.tma_load_lr.get_tma_descriptor());  // svdq
  }

  /// Set up the data needed by this collective for load and mma.
  /// Returns a tuple of tensors. The collective and the kernel layer have the contract
  /// Returned tuple must contain at least two elements, with the first two elements being:
  /// gA_mkl - The tma tensor, A after a local tile so it has shape  (BLK_M,BLK_K,m,k,l)
  /// gB_nkl - The tma tensor, B after a local tile so it has shape  (BLK_N,BLK_K,n,k,l)
  /// The rest of the tensors can be specified as needed by this collective.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto
  load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& mainloop_params) const {
    using X = Underscore;
    // Separate out problem shape for convenience
    auto [M,N,K,L] = problem_shape_MNKL;

    // TMA requires special handling of strides to deal with coord codomain mapping
    // Represent the full tensors -- get these from TMA
    Tensor mA_mkl = mainloop_params.tma_load_a.get_tma_tensor(make_shape(M,K,L));                            // (m,k,l)
    Tensor mB_nkl = mainloop_params.tma_load_b.get_tma_tensor(make_shape(N,K,L));                            // (n,k,l)

    // Make tiled views, defer the slice
    Tensor gA_mkl = local_tile(mA_mkl, TileShape{}, make_coord(_,_,_), Step<_1, X,_1>{});        // (BLK_M,BLK_K,m,k,l)
    Tensor gB_nkl = local_tile(mB_nkl, TileShape{}, make_coord(_,_,_), Step< X,_1,_1>{});        // (BLK_N,BLK_K,n,k,l)

    // svdq: the low-rank k-tiles' coordinates
    int const lr_cols = mainloop_params.lr_k_tiles * LrKB;
    Tensor mL1 = mainloop_params.tma_load_l1.get_tma_tensor(make_shape(M,lr_cols,L));                       // (m,lrk,l)
    Tensor mLR = mainloop_params.tma_load_lr.get_tma_tensor(make_shape(N,lr_cols,L));                       // (n,lrk,l)
    Tensor gL1 = local_tile(mL1, LrTileShape{}, make_coord(_,_,_), Step<_1, X,_1>{});            // (BLK_M,LrKB,m,j,l)
    Tensor gLR = local_tile(mLR, LrTileShape{}, make_coord(_,_,_), Step< X,_1,_1>{});            // (BLK_N,LrKB,n,j,l)

    return cute::make_tuple(gA_mkl, gB_nkl, gL1, gLR);
  }

  /// Perform a collective-scoped matrix multiply-accumulate
  /// Producer Perspective
  template <
    class TensorA, class TensorB, class TensorL1, class TensorLR,
    class KTileIterator, class BlockCoord
  >
  CUTLASS_DEVICE void
  load(
      Params const& mainloop_params,
      MainloopPipeline pipeline,
      PipelineState smem_pipe_write,
      cute::tuple<TensorA, TensorB, TensorL1, TensorLR> const& load_inputs,
      BlockCoord const& blk_coord,
      KTileIterator k_tile_iter, int k_tile_count,
      int thread_idx,
      uint32_t block_rank_in_cluster,
      TensorStorage& shared_tensors) {
    int lane_predicate = cute::elect_one_sync();

    if (lane_predicate) {
      Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});        // (BLK_M,BLK_K,PIPE)
      Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});        // (BLK_N,BLK_K,PIPE)
      // svdq: the same buffers as bf16
      Tensor sL1 = make_tensor(make_smem_ptr(reinterpret_cast<ElementLR*>(shared_tensors.smem_A.data())), SmemLayoutALR{});  // (BLK_M,LrKB,PIPE)
      Tensor sLR = make_tensor(make_smem_ptr(reinterpret_cast<ElementLR*>(shared_tensors.smem_B.data())), SmemLayoutBLR{});  // (BLK_N,LrKB,PIPE)

      //
      // Prepare the TMA loads for A and B
      //

      constexpr uint32_t cluster_shape_x = get<0>(typename DispatchPolicy::ClusterShape());
      uint2 cluster_local_block_id = {block_rank_in_cluster % cluster_shape_x, block_rank_in_cluster / cluster_shape_x};

      Tensor gA_mkl = get<0>(load_inputs);
      Tensor gB_nkl = get<1>(load_inputs);

      auto block_tma_a = mainloop_params.tma_load_a.get_slice(cluster_local_block_id.y);
      auto block_tma_b = mainloop_params.tma_load_b.get_slice(cluster_local_block_id.x);
      auto block_tma_l1 = mainloop_params.tma_load_l1.get_slice(cluster_local_block_id.y);  // svdq
      auto block_tma_lr = mainloop_params.tma_load_lr.get_slice(cluster_local_block_id.x);  // svdq

      // Partition the inputs based on the current block coordinates.
      auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
      Tensor gA = gA_mkl(_,_,m_coord,_,l_coord);                                                     // (BLK_M,BLK_K,k)
      Tensor gB = gB_nkl(_,_,n_coord,_,l_coord);                                                     // (BLK_N,BLK_K,k)
      Tensor gL1 = get<2>(load_inputs)(_,_,m_coord,_,l_coord);                                  // svdq: (BLK_M,LrKB,j)
      Tensor gLR = get<3>(load_inputs)(_,_,n_coord,_,l_coord);                                  // svdq: (BLK_N,LrKB,j)

      // Applies the mapping from block_tma_a
      Tensor tAgA = block_tma_a.partition_S(gA);                                                 // (TMA,TMA_M,TMA_K,k)
      Tensor tAsA = block_tma_a.partition_D(sA);                                              // (TMA,TMA_M,TMA_K,PIPE)

      Tensor tBgB = block_tma_b.partition_S(gB);                                                 // (TMA,TMA_N,TMA_K,k)
      Tensor tBsB = block_tma_b.partition_D(sB);                                              // (TMA,TMA_N,TMA_K,PIPE)

      Tensor tL1gL1 = block_tma_l1.partition_S(gL1);                                             // svdq: (TMA,TMA_M,TMA_K,j)
      Tensor tL1sL1 = block_tma_l1.partition_D(sL1);                                          // svdq: (TMA,TMA_M,TMA_K,PIPE)
      Tensor tLRgLR = block_tma_lr.partition_S(gLR);                                             // svdq: (TMA,TMA_N,TMA_K,j)
      Tensor tLRsLR = block_tma_lr.partition_D(sLR);                                          // svdq: (TMA,TMA_N,TMA_K,PIPE)

      uint16_t mcast_mask_a = 0;
      uint16_t mcast_mask_b = 0;

      // Issue TmaLoads
      // Maps the tile -> block, value
      if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
        auto block_layout = Layout<typename DispatchPolicy::ClusterShape>{}; // (m,n) -> block_id
        for (int n = 0; n < size<1>(block_layout); ++n) {
          mcast_mask_a |= (uint16_t(1) << block_layout(cluster_local_block_id.x,n,Int<0>{}));
        }
      }

      if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
        auto block_layout = Layout<typename DispatchPolicy::ClusterShape>{}; // (m,n) -> block_id
        for (int m = 0; m < size<0>(block_layout); ++m) {
          mcast_mask_b |= (uint16_t(1) << block_layout(m,cluster_local_block_id.y,Int<0>{}));
        }
      }

      // Mainloop
      CUTLASS_PRAGMA_NO_UNROLL
      for ( ; k_tile_count > 0; --k_tile_count) {
        int const k_tile = *k_tile_iter;
        // svdq: publish the k-tile's index before the stage's arrive (release; see the class comment)
        store_k_tile_index(shared_tensors, smem_pipe_write.count(), k_tile);

        // LOCK smem_pipe_write for _writing_
        pipeline.producer_acquire(smem_pipe_write);

        //
        // Copy gmem to smem for *k_tile_iter
        //

        using BarrierType = typename MainloopPipeline::ProducerBarrierType;
        BarrierType* tma_barrier = pipeline.producer_get_barrier(smem_pipe_write);

        int write_stage = smem_pipe_write.index();
        int const j = k_tile - mainloop_params.k_tiles_real;
        if (j >= 0) {  // svdq: a low-rank k-tile: L1 and lr, the same bytes per stage as an FP8 one
          copy(mainloop_params.tma_load_l1.with(*tma_barrier, mcast_mask_a), tL1gL1(_,_,_,j), tL1sL1(_,_,_,write_stage));
          copy(mainloop_params.tma_load_lr.with(*tma_barrier, mcast_mask_b), tLRgLR(_,_,_,j), tLRsLR(_,_,_,write_stage));
        }
        else {
          copy(mainloop_params.tma_load_a.with(*tma_barrier, mcast_mask_a), tAgA(_,_,_,k_tile), tAsA(_,_,_,write_stage));
          copy(mainloop_params.tma_load_b.with(*tma_barrier, mcast_mask_b), tBgB(_,_,_,k_tile), tBsB(_,_,_,write_stage));
        }
        ++k_tile_iter;

        // Advance smem_pipe_write
        ++smem_pipe_write;
      }
    }
  }

  // svdq: the k-tile index ring. Plain shared-memory accesses as asm with a memory clobber, so the
  // compiler keeps them on their side of the barrier operations (whose asm has no clobber): the
  // producer's store before its arrive (mbarrier.arrive: release), the consumers' load after
  // their wait (mbarrier.try_wait: acquire).
  CUTLASS_DEVICE static void
  store_k_tile_index(TensorStorage& shared_tensors, uint32_t count, int k_tile) {
    uint32_t addr = cute::cast_smem_ptr_to_uint(shared_tensors.k_tile_index.data() + count % KTileRing);
    asm volatile("st.shared.b32 [%0], %1;\n" :: "r"(addr), "r"(k_tile) : "memory");
  }

  CUTLASS_DEVICE static int
  load_k_tile_index(TensorStorage& shared_tensors, uint32_t count) {
    uint32_t addr = cute::cast_smem_ptr_to_uint(shared_tensors.k_tile_index.data() + count % KTileRing);
    int k_tile;
    asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(k_tile) : "r"(addr) : "memory");
    return k_tile;
  }

  /// Perform a Producer Epilogue to prevent early exit of blocks in a Cluster
  CUTLASS_DEVICE void
  load_tail(MainloopPipeline pipeline, PipelineState smem_pipe_write) {
    int lane_predicate = cute::elect_one_sync();

    // Issue the epilogue waits
    if (lane_predicate) {
      /* This helps avoid early exit of blocks in Cluster
       * Waits for all stages to either be released (all
       * Consumer UNLOCKs), or if the stage was never used
       * then would just be acquired since the phase was
       * still inverted from make_producer_start_state
       */
      pipeline.producer_tail(smem_pipe_write);
    }
  }

  /// Perform a collective-scoped matrix multiply-accumulate
  /// Consumer Perspective
  template <
    class FrgTensorC
  >
  CUTLASS_DEVICE void
  mma(MainloopPipeline pipeline,
      PipelineState smem_pipe_read,
      FrgTensorC& accum,
      int k_tile_count,
      int thread_idx,
      TensorStorage& shared_tensors,
      Params const& mainloop_params) {
    static_assert(is_rmem<FrgTensorC>::value, "C tensor must be rmem resident.");
    static_assert(cute::rank(SmemLayoutA{}) == 3, "Smem layout must be rank 3.");
    static_assert(cute::rank(SmemLayoutB{}) == 3, "Smem layout must be rank 3.");
    static_assert(cute::is_void_v<SmemCopyAtomA>,
      "SM90 GMMA mainloops cannot have a non-void copy atom for smem sourced instructions.");
    static_assert(cute::is_void_v<SmemCopyAtomB>,
      "SM90 GMMA mainloops cannot have a non-void copy atom for smem sourced instructions.");

    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});          // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});          // (BLK_N,BLK_K,PIPE)
    // svdq: the same buffers as bf16 (the low-rank k-tiles)
    Tensor sL1 = make_tensor(make_smem_ptr(reinterpret_cast<ElementLR*>(shared_tensors.smem_A.data())), SmemLayoutALR{});  // (BLK_M,LrKB,PIPE)
    Tensor sLR = make_tensor(make_smem_ptr(reinterpret_cast<ElementLR*>(shared_tensors.smem_B.data())), SmemLayoutBLR{});  // (BLK_N,LrKB,PIPE)

    //
    // Define C accumulators and A/B partitioning
    //

    // Layout of warp group to thread mapping

    static_assert(stride<0>(typename TiledMma::ALayout{}) == 0 and
                  stride<0>(typename TiledMma::BLayout{}) == 0 and
                  size<0>(typename TiledMma::ALayout{}) == NumThreadsPerWarpGroup and
                  size<0>(typename TiledMma::BLayout{}) == NumThreadsPerWarpGroup,
                  "Stride of the first mode must be 0 and the size of the mode must be NumThreadsPerWarpGroup");

    constexpr int MmaWarpGroups = size(TiledMma{}) / NumThreadsPerWarpGroup;
    Layout warp_group_thread_layout = make_layout(Int<MmaWarpGroups>{},
                                                  Int<NumThreadsPerWarpGroup>{});

    int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / NumThreadsPerWarpGroup, 0);

    TiledMma tiled_mma;
    auto thread_mma = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));

    Tensor tCsA = thread_mma.partition_A(sA);                                                 // (MMA,MMA_M,MMA_K,PIPE)
    Tensor tCsB = thread_mma.partition_B(sB);                                                 // (MMA,MMA_N,MMA_K,PIPE)

    // Allocate "fragments/descriptors"
    Tensor tCrA = thread_mma.make_fragment_A(tCsA);                                           // (MMA,MMA_M,MMA_K,PIPE)
    Tensor tCrB = thread_mma.make_fragment_B(tCsB);                                           // (MMA,MMA_N,MMA_K,PIPE)

    // svdq: the low-rank k-tiles' descriptors
    TiledMmaLR tiled_mma_lr;
    auto thread_mma_lr = tiled_mma_lr.get_slice(warp_group_thread_layout(warp_group_idx));
    Tensor tCrL1 = thread_mma_lr.make_fragment_A(thread_mma_lr.partition_A(sL1));            // (MMA,MMA_M,LrKB/16,PIPE)
    Tensor tCrLR = thread_mma_lr.make_fragment_B(thread_mma_lr.partition_B(sLR));            // (MMA,MMA_N,LrKB/16,PIPE)

    CUTE_STATIC_ASSERT_V(size<1>(tCsA) == size<1>(accum));                                                         // M
    CUTE_STATIC_ASSERT_V(size<1>(tCsB) == size<2>(accum));                                                         // N
    CUTE_STATIC_ASSERT_V(size<2>(tCsA) == size<2>(tCsB));                                                          // K
    CUTE_STATIC_ASSERT_V(size<3>(tCsA) == size<3>(tCsB));                                                       // PIPE
    CUTE_STATIC_ASSERT_V(Int<DispatchPolicy::Stages>{} == size<2>(sA));                                         // PIPE
    CUTE_STATIC_ASSERT_V(Int<DispatchPolicy::Stages>{} == size<2>(sB));                                         // PIPE
    CUTE_STATIC_ASSERT_V(size<1>(tCrL1) == size<1>(accum) && size<1>(tCrLR) == size<2>(accum));         // svdq

    //
    // PIPELINED MAIN LOOP
    //
    static_assert((0 <= K_PIPE_MMAS) && (K_PIPE_MMAS <  K_PIPE_MAX),
        "ERROR : Incorrect number of MMAs in flight");

    // svdq: one k-tile's wgmmas as one batch: four FP8 ones (K = 32), or two bf16 ones (K = 16) on a
    // low-rank k-tile; the first wgmma of the work unit overwrites the accumulator (ScaleOut::Zero).
    // Each branch arrives and commits itself.
    auto mma_tile = [&](PipelineState const& read) {
      int const read_stage = read.index();
      if (load_k_tile_index(shared_tensors, read.count()) >= mainloop_params.k_tiles_real) {
        warpgroup_arrive();
        CUTLASS_PRAGMA_UNROLL
        for (int k_block = 0; k_block < LrKBlocks; ++k_block) {
          tiled_mma_lr.accumulate_ = tiled_mma.accumulate_;
          cute::gemm(tiled_mma_lr, tCrL1(_,_,k_block,read_stage), tCrLR(_,_,k_block,read_stage), accum);
          tiled_mma.accumulate_ = GMMA::ScaleOut::One;
        }
        warpgroup_commit_batch();
        return;
      }
      warpgroup_arrive();
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
        // (V,M,K) x (V,N,K) => (V,M,N)
        cute::gemm(tiled_mma, tCrA(_,_,k_block,read_stage), tCrB(_,_,k_block,read_stage), accum);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
    };

    // We release buffers to producer warps(dma load) with some mmas in flight
    PipelineState smem_pipe_release = smem_pipe_read;

    // Prologue GMMAs
    int prologue_mma_count = min(K_PIPE_MMAS, k_tile_count);
    assert(k_tile_count >= 1);
    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    warpgroup_fence_operand(accum);
    {
      // WAIT on smem_pipe_read until its data are available (phase bit flips from rdPhaseBit value)
      auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, barrier_token);

      // svdq: the k-blocks (ScaleOut::Zero on the first, then One) in mma_tile
      mma_tile(smem_pipe_read);

      ++smem_pipe_read;
    }

    tiled_mma.accumulate_ = GMMA::ScaleOut::One;

    warpgroup_fence_operand(accum);
    CUTLASS_PRAGMA_UNROLL
    for (int k_tile_prologue = prologue_mma_count - 1; k_tile_prologue > 0; --k_tile_prologue)
    {
      // WAIT on smem_pipe_read until its data are available (phase bit flips from rdPhaseBit value)
      auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, barrier_token);

      mma_tile(smem_pipe_read);  // svdq

      ++smem_pipe_read;
    }

    warpgroup_fence_operand(accum);
    // Mainloop GMMAs
    k_tile_count -= prologue_mma_count;

    CUTLASS_PRAGMA_NO_UNROLL
    for ( ; k_tile_count > 0; --k_tile_count)
    {
      // WAIT on smem_pipe_read until its data are available (phase bit flips from rdPhaseBit value)
      auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, barrier_token);

      //
      // Compute on k_tile
      //

      warpgroup_fence_operand(accum);
      mma_tile(smem_pipe_read);  // svdq

      /// Wait on the GMMA barrier for K_PIPE_MMAS (or fewer) outstanding to ensure smem_pipe_write is consumed
      warpgroup_wait<K_PIPE_MMAS>();
      warpgroup_fence_operand(accum);

      // UNLOCK smem_pipe_release, done _computing_ on it
      pipeline.consumer_release(smem_pipe_release);

      // Advance smem_pipe_read and smem_pipe_release
      ++smem_pipe_read;
      ++smem_pipe_release;
    }

    warpgroup_fence_operand(accum);
  }

  /// Perform a Consumer Epilogue to release all buffers
  CUTLASS_DEVICE void
  mma_tail(MainloopPipeline pipeline, PipelineState smem_pipe_release, int k_tile_count) {
    // Prologue GMMAs
    int prologue_mma_count = min(K_PIPE_MMAS, k_tile_count);
    k_tile_count -= prologue_mma_count;

    smem_pipe_release.advance(k_tile_count);

    // Wait on all GMMAs to complete
    warpgroup_wait<0>();

    for (int count = 0; count < prologue_mma_count; ++count) {
      pipeline.consumer_release(smem_pipe_release);                 // UNLOCK smem_pipe_release, done _computing_ on it
      ++smem_pipe_release;
    }
  }
};

/////////////////////////////////////////////////////////////////////////////////////////////////

} // namespace cutlass::gemm::collective

/////////////////////////////////////////////////////////////////////////////////////////////////
