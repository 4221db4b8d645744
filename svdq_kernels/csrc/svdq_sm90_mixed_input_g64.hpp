// svdquant: group-64 int4 x FP8 mixed-input mainloop for sm_90a, derived from CUTLASS 4.2.
// The original license of the file it derives from follows.
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
#include "cutlass/numeric_conversion.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/detail/dependent_false.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/detail/layout.hpp"
#include "cutlass/pipeline/pipeline.hpp"
#include "cutlass/transform/collective/sm90_wgmma_transpose.hpp"
#include "cutlass/pipeline/pipeline.hpp"
#include "cutlass/trace.h"
#include "cutlass/detail/collective.hpp"
#include "cutlass/detail/collective/mixed_input_utils.hpp"

#include "cute/arch/cluster_sm90.hpp"
#include "cute/arch/copy_sm90.hpp"
#include "cute/algorithm/functional.hpp"
#include "cute/atom/mma_atom.hpp"
#include "cute/atom/copy_traits_sm90_tma.hpp"
#include "cute/algorithm/gemm.hpp"
#include "cute/numeric/arithmetic_tuple.hpp"

/////////////////////////////////////////////////////////////////////////////////////////////////

// svdq: a timing probe of the producer conversion (benchmarks only, wrong results): the converter
// warps keep their barriers but convert nothing, so the consumers multiply stale e4m3 slots. Its
// time is what the producer kernel would take if the conversion were free.
#ifndef SVDQ_CONVERT_PROBE
#define SVDQ_CONVERT_PROBE 0
#endif

namespace cutlass::gemm::collective {
using namespace cute;

// svdq: our classes live beside the stock ones (same name lookup), prefixed Svdq.
template <class Collective> struct SvdqGroup64Utils;

/////////////////////////////////////////////////////////////////////////////////////////////////

// svdquant: the stock int4 x FP8 mixed-input mainloop (A from registers) with group-64 scales
// inside a 128-wide K tile. Differences from CUTLASS 4.2's
// sm90_mma_tma_gmma_rs_warpspecialized_mixed_input.hpp, all marked "svdq:":
//  * the scale tile per stage is [TileM, TileK / 64] (stock: [TileM, 1], one group per k-tile);
//  * the MMA threads read the scales through a [TileM, TileK] view whose K stride is
//    (64 : 0, TileK/64 : TileM), so k-block kb uses group kb * 32 / 64, and they copy the scales
//    for every k-block (SvdqGroup64Utils::copy_tensors_MK; the stock code copies once per k-tile);
//  * the group size must be 64 and K a multiple of TileK (can_implement);
//  * optional promotion of the FP8 partial sums to the fp32 accumulator (PromoteKTiles);
//  * optional low-rank k-tiles (LowRankUp): the SVDQuant up projection lr . L1^T as bf16 MMAs into
//    the same accumulator, after the FP8 k-tiles (no separate GEMM, no bf16 source tensor).
// Everything else (pipeline, TMA, warp specialization, the conversion) is the stock code.
template <
  class DispatchPolicy_,
  class TileShape_,
  class ElementAOptionalTuple,
  class StrideA_,
  class ElementBOptionalTuple,
  class StrideB_,
  class TiledMma_,
  class GmemTiledCopyA_,
  class SmemLayoutAtomA_,
  class SmemCopyAtomA_,
  class TransformA_,
  class GmemTiledCopyB_,
  class SmemLayoutAtomB_,
  class SmemCopyAtomB_,
  class TransformB_,
  int PromoteKTiles_ = 0,
  bool ScaleLut_ = false,
  bool LowRankUp_ = false,
  int ConvertStages_ = 0>
struct SvdqSm90MixedInputGroup64Mma
{
public:

  //
  // Type Aliases
  //
  using ConversionMode = cutlass::detail::ConversionMode;
  using DispatchPolicy = DispatchPolicy_;
  using TileShape = TileShape_;
  using KernelSchedule = typename DispatchPolicy::Schedule;
  using ClusterShape = typename DispatchPolicy::ClusterShape;
  static constexpr int Stages = DispatchPolicy::Stages;
  // svdq: FP8 MMAs accumulate with reduced precision on Hopper; with PromoteKTiles > 0 they
  // accumulate into a temporary that is added to the fp32 accumulator every PromoteKTiles
  // k-tiles (0: never, the stock behaviour). Costs a second accumulator's registers.
  static constexpr int PromoteKTiles = PromoteKTiles_;
  // svdq: with ScaleLut the int4 -> e4m3 conversion is a table lookup (SvdqGroup64Utils::make_lut):
  // each thread builds, once per 64-group and row, the 16 bytes e4m3(fp16(code * scale)) for
  // code = -8..7 from the fp16 scale, then converts four weights with three byte permutes
  // instead of int4 -> fp16, an fp16 multiply and fp16 -> e4m3 per pair. Same bits.
  static constexpr bool ScaleLut = ScaleLut_;
  // svdq: with LowRankUp the problem's K is the weights' K plus lr_k_tiles low-rank k-tiles. The
  // producer fills a low-rank k-tile's stage with TileM x 32 bf16 of L1 (in the A buffer: the same
  // bytes as TileM x TileK int4) and TileN x 64 bf16 of lr (in the B buffer: the same bytes as
  // TileN x TileK e4m3; only the first 32 columns are used); the scale rows of such a k-tile hold
  // LrScaleSentinel, by which the consumer recognises it and runs two bf16 SS MMAs (K = 16 each)
  // into the accumulator instead of the FP8 ones. The epilogue scales the accumulator by
  // rowinv[n] * a[m], so L1 arrives multiplied by 1 / rowinv and lr divided by a (host side).
  static constexpr bool LowRankUp = LowRankUp_;
  // svdq: with ConvertStages > 0 (the producer conversion, kernel svdq_sm90_gemm_producer_convert.hpp)
  // the consumer warps no longer convert: the producer warpgroup's idle warps wait on a stage's TMA
  // barrier, convert its int4 A tile by the same table lookup (same bits) into an e4m3 tile in a
  // ring of ConvertStages swizzled K-major slots (smem_A8), fence it for the async proxy and arrive
  // on the slot's "converted full" barrier; the consumers run SS FP8 wgmmas from that slot and
  // the stage's B tile, then release the TMA stage and arrive on the slot's "converted empty" one.
  static constexpr int ConvertStages = ConvertStages_;
  static constexpr bool ProducerConvert = ConvertStages_ > 0;

private:
  template<class T> friend struct detail::MixedInputUtils;
  template<class T> friend struct SvdqGroup64Utils;
  using CollectiveType = SvdqSm90MixedInputGroup64Mma<DispatchPolicy, TileShape_,
                                       ElementAOptionalTuple, StrideA_,
                                       ElementBOptionalTuple, StrideB_,
                                       TiledMma_,
                                       GmemTiledCopyA_, SmemLayoutAtomA_, SmemCopyAtomA_,
                                       TransformA_,
                                       GmemTiledCopyB_, SmemLayoutAtomB_, SmemCopyAtomB_,
                                       TransformB_, PromoteKTiles_, ScaleLut_, LowRankUp_, ConvertStages_>;
  using Utils = SvdqGroup64Utils<CollectiveType>;

  using ScaleA = detail::deduce_mixed_width_dtype_t<1, ElementAOptionalTuple>;
  using ScaleB = detail::deduce_mixed_width_dtype_t<1, ElementBOptionalTuple>;
  using ZeroA = detail::deduce_mixed_width_dtype_t<2, ElementAOptionalTuple>;
  using ZeroB = detail::deduce_mixed_width_dtype_t<2, ElementBOptionalTuple>;

public:
  static_assert(cute::is_tuple<ElementAOptionalTuple>::value ^ cute::is_tuple<ElementBOptionalTuple>::value,
    "Either A OR B must be a tuple. It must take the from {ElementOperand, [ElementScale],"
    "[ElementZero]}. Inputs in [] are optional.");

  using ElementA = detail::deduce_mixed_width_dtype_t<0, ElementAOptionalTuple>;
  using ElementB = detail::deduce_mixed_width_dtype_t<0, ElementBOptionalTuple>;
  static constexpr bool IsATransformed = cute::is_tuple<ElementAOptionalTuple>::value;
  using ElementScale = cute::conditional_t<IsATransformed, ScaleA, ScaleB>;
  using ElementZero = cute::conditional_t<IsATransformed, ZeroA, ZeroB>;
  // For cases where we can't have a void type, we can use this to allow the code to compile when the scale / zero is void.
  using NonVoidElementScale = cute::conditional_t<cute::is_void_v<ElementScale>, float, ElementScale>;
  using NonVoidElementZero = cute::conditional_t<cute::is_void_v<ElementZero>, float, ElementZero>;

  using StrideA = StrideA_;
  using StrideB = StrideB_;
  // These are always MN major
  using StrideScale = cute::Stride<cute::Int<1>, int64_t, int64_t>;
  // For cases where we can't have a void scale, we can use this to allow the code to compile when the scale is void.
  using NonVoidStrideScale = cute::conditional_t<
      cute::is_void_v<StrideScale>, cute::Stride<_1, int64_t, int64_t>, StrideScale>;

  static_assert(( IsATransformed && (cutlass::gemm::detail::is_k_major<StrideA>() || is_layout<StrideA>::value)) ||
                (!IsATransformed && (cutlass::gemm::detail::is_k_major<StrideB>() || is_layout<StrideB>::value)),
                "The transformed type must be K-major.");

  static_assert(( IsATransformed && (sizeof(ElementB) == 2)) ||
                (!IsATransformed && (sizeof(ElementA) == 2)) ||
                ((cutlass::gemm::detail::is_k_major<StrideA>() || is_layout<StrideA>::value) &&
                 (cutlass::gemm::detail::is_k_major<StrideB>() || is_layout<StrideB>::value)),
                "The unscaled element must be 2 bytes OR both inputs must be K-major");

  static_assert(cutlass::gemm::detail::is_mn_major<NonVoidStrideScale>(),
    "Scale must be MN major [Col Major if A is scaled, Row Major if B is scaled].");

  using CtaShape_MNK = decltype(shape_div(TileShape{}, ClusterShape{}));

  using TiledMma = TiledMma_;
  using ElementAccumulator = typename TiledMma::ValTypeC;

  using GmemTiledCopyA = GmemTiledCopyA_;
  using GmemTiledCopyB = GmemTiledCopyB_;
  using GmemTiledCopyScale = cute::SM90_TMA_LOAD;

  using SmemLayoutAtomA = SmemLayoutAtomA_;
  using SmemLayoutAtomB = SmemLayoutAtomB_;
  // Scale layout atom set after swapping.

  using SmemCopyAtomA = SmemCopyAtomA_;
  using SmemCopyAtomB = SmemCopyAtomB_;
  using SmemCopyAtomScale = Copy_Atom<cute::AutoVectorizingCopy, NonVoidElementScale>;

  // We must ensure the type to be scaled goes to RF
  static constexpr bool SwapAB = !IsATransformed;
  using SwappedSmemLayoutAtomA = cute::conditional_t<!SwapAB, SmemLayoutAtomA, SmemLayoutAtomB>;
  using SwappedSmemLayoutAtomB = cute::conditional_t<!SwapAB, SmemLayoutAtomB, SmemLayoutAtomA>;
  using SwappedSmemCopyAtomA   = cute::conditional_t<!SwapAB, SmemCopyAtomA, SmemCopyAtomB>;
  using SwappedSmemCopyAtomB   = cute::conditional_t<!SwapAB, SmemCopyAtomB, SmemCopyAtomA>;

  // TMA converts f32 input to tf32 when copying from GMEM to SMEM
  // For all other types, cast to size equivalent uint type to avoid any rounding by TMA.
  static constexpr bool ConvertF32toTF32A = cute::is_same_v<float, ElementA>;
  static constexpr bool ConvertF32toTF32B = cute::is_same_v<float, ElementB>;
  using ConvertedElementA = cute::conditional_t<ConvertF32toTF32A, tfloat32_t, uint_bit_t<sizeof_bits_v<ElementA>>>;
  using ConvertedElementB = cute::conditional_t<ConvertF32toTF32B, tfloat32_t, uint_bit_t<sizeof_bits_v<ElementB>>>;
  using RealSwappedElementA = cute::conditional_t<!SwapAB, ElementA, ElementB>;
  using RealSwappedElementB = cute::conditional_t<!SwapAB, ElementB, ElementA>;
  using SwappedElementA = cute::conditional_t<!SwapAB, ConvertedElementA, ConvertedElementB>;
  using SwappedElementB = cute::conditional_t<!SwapAB, ConvertedElementB, ConvertedElementA>;
  using SwappedStrideA  = cute::conditional_t<!SwapAB, StrideA, StrideB>;
  using SwappedStrideB  = cute::conditional_t<!SwapAB, StrideB, StrideA>;

  using TransformA = TransformA_;
  using TransformB = TransformB_;
  using SwappedTransformA  = cute::conditional_t<!SwapAB, TransformA, TransformB>;
  using SwappedTransformB  = cute::conditional_t<!SwapAB, TransformB, TransformA>;

  static constexpr int IsSubbyteA = cute::sizeof_bits_v<SwappedElementA> < 8;
  using TmaElementA = cute::conditional_t<IsSubbyteA, uint8_t, SwappedElementA>;
  using TmaElementScale = uint_bit_t<sizeof_bits_v<NonVoidElementScale> >; // in case we have array. translating to uint to satisfy tma descriptor's specialization

  using ArchTag = typename DispatchPolicy::ArchTag;

  using MainloopPipeline = cutlass::PipelineTmaAsync<
                             DispatchPolicy::Stages>;
  using PipelineState = cutlass::PipelineState<DispatchPolicy::Stages>;

  using PipelineParams = typename MainloopPipeline::Params;

  // One threads per CTA are producers (1 for operand tile)
  static constexpr int NumProducerThreadEvents = 1;

  // svdq: scale groups of 64 along K, TileK / 64 of them per k-tile, stored column-major.
  static constexpr int ScaleGroupK = 64;
  static constexpr int ScaleColsPerTile = size<2>(TileShape{}) / ScaleGroupK;
  static_assert(size<2>(TileShape{}) % ScaleGroupK == 0, "svdq: TileK must be a multiple of 64");
  using SmemLayoutAtomScale = Layout<Shape<decltype(cute::shape<0>(TileShape{})), cute::Int<ScaleColsPerTile>>>;
  using ScaleTileShape = decltype(make_shape(shape<0>(TileShape{}), shape<1>(SmemLayoutAtomScale{})));

  static_assert(cute::rank(SwappedSmemLayoutAtomA{}) == 2, "SmemLayoutAtom must be rank 2 (M/N, K)");
  static_assert((size<0>(TileShape{}) % size<0>(SwappedSmemLayoutAtomA{})) == 0, "SmemLayoutAtom must evenly divide tile shape.");
  static_assert((size<2>(TileShape{}) % size<1>(SwappedSmemLayoutAtomA{})) == 0, "SmemLayoutAtom must evenly divide tile shape.");

  static_assert(cute::rank(SwappedSmemLayoutAtomB{}) == 2, "SmemLayoutAtom must be rank 2 (M/N, K)");
  static_assert((size<1>(TileShape{}) % size<0>(SwappedSmemLayoutAtomB{})) == 0, "SmemLayoutAtom must evenly divide tile shape.");
  static_assert((size<2>(TileShape{}) % size<1>(SwappedSmemLayoutAtomB{})) == 0, "SmemLayoutAtom must evenly divide tile shape.");

  static_assert(rank(SmemLayoutAtomScale{}) == 2, "SmemLayoutAtomScale must be rank 2");
  static_assert((size<0>(TileShape{}) % size<0>(SmemLayoutAtomScale{})) == 0, "SmemLayoutAtomScale must equal the tile shape.");
  static_assert((size<2>(TileShape{}) % size<1>(SmemLayoutAtomScale{})) == 0, "SmemLayoutAtomScale must evenly divide tile k shape.");

  // Tile along modes in a way that maximizes the TMA box size.

  using SmemLayoutA = decltype(detail::get_smem_layout<DispatchPolicy::Stages>(SwappedSmemLayoutAtomA{}, select<0,2>(TileShape{}), SwappedStrideA{}));
  using SmemLayoutB = decltype(detail::get_smem_layout<DispatchPolicy::Stages>(SwappedSmemLayoutAtomB{}, select<1,2>(TileShape{}), SwappedStrideB{}));

  // It is assumed that the scales and zero-points share the same smem layout
  using SmemLayoutScale = decltype(tile_to_shape(
    SmemLayoutAtomScale{},
    make_shape(shape<0>(ScaleTileShape{}), shape<1>(ScaleTileShape{}), Int<Stages>{}),
    cute::conditional_t< ::cutlass::gemm::detail::is_major<0,NonVoidStrideScale>(), Step<_2,_1,_3>, Step<_1,_2,_3>>{}));

  static_assert(DispatchPolicy::Stages >= 2, "Specialization requires Stages set to value 2 or more.");
  static_assert(not cute::is_base_of<cute::GMMA::DescriptorIterator, typename TiledMma::FrgTypeA>::value &&
                    cute::is_base_of<cute::GMMA::DescriptorIterator, typename TiledMma::FrgTypeB>::value,
                "MMA atom must source A from rmem and B operand from smem_desc for this mainloop.");
  static_assert(cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD> || cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>,
      "GmemTiledCopy - invalid SM90 TMA copy atom specified.");
  static_assert(cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD> || cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>,
      "GmemTiledCopy - invalid SM90 TMA copy atom specified.");

  // To relax them, we need to handle loading more than 1 row of scales for every main loop iteration.
  // We must also handle updating the pipeline transaction bytes on the fly.
  // NOTE: Deleting this assertion without required changes will cause the code to hang.
  // svdq: the stock size<1>(SmemLayoutAtomScale) == 1 requirement is lifted: the scale tile is
  // loaded whole with every k-tile (its bytes are in TmaTransactionBytesExtra) and read through
  // this view, in which k-block kb (MMA K = 32) finds its group's column.
  using SmemLayoutScaleMma = Layout<
      Shape<decltype(cute::shape<0>(TileShape{})), Shape<cute::Int<ScaleGroupK>, cute::Int<ScaleColsPerTile>>, cute::Int<DispatchPolicy::Stages>>,
      Stride<_1, Stride<_0, decltype(cute::shape<0>(TileShape{}))>, cute::Int<size<0>(TileShape{}) * ScaleColsPerTile>>>;
  static_assert(cute::cosize_v<SmemLayoutScaleMma> == cute::cosize_v<SmemLayoutScale>, "svdq: scale view must cover the scale buffer");

  // svdq: the low-rank k-tiles (LowRankUp), bf16 views of the stage buffers.
  using ElementLR = cutlass::bfloat16_t;
  static constexpr int LrK = 32;        // bf16 K of one low-rank k-tile (A buffer: TileM x 32 bf16)
  static constexpr int LrKB = 64;       // bf16 width of its lr box (B buffer rows: TileK bytes)
  static constexpr int LrKBlocks = LrK / 16;
  static constexpr uint16_t LrScaleSentinel = 0x7e5b;  // an fp16 NaN no quantizer writes
  using LrTileShapeA = Shape<decltype(shape<0>(TileShape{})), decltype(shape<1>(TileShape{})), Int<LrK>>;
  using LrTileShapeB = Shape<decltype(shape<0>(TileShape{})), decltype(shape<1>(TileShape{})), Int<LrKB>>;
  using SmemLayoutALR = decltype(tile_to_shape(GMMA::Layout_K_SW64_Atom<ElementLR>{},
      make_shape(shape<0>(TileShape{}), Int<LrK>{}, Int<Stages>{})));
  using SmemLayoutBLR = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<ElementLR>{},
      make_shape(shape<1>(TileShape{}), Int<LrKB>{}, Int<Stages>{})));
  using TiledMmaLR = decltype(make_tiled_mma(
      GMMA::ss_op_selector<ElementLR, ElementLR, float, LrTileShapeA, GMMA::Major::K, GMMA::Major::K>(),
      Layout<Shape<Int<size(TiledMma_{}) / NumThreadsPerWarpGroup>, _1, _1>>{}));
  static_assert(!LowRankUp || PromoteKTiles == 0, "svdq: the low-rank k-tiles need the unpromoted accumulator");
  static_assert(!LowRankUp || (sizeof_bits_v<RealSwappedElementB> == 8 && size<2>(TileShape{}) == 128),
                "svdq: the low-rank k-tiles need e4m3 activations and TileK = 128");
  static_assert(!LowRankUp || size(TiledMmaLR{}) == size(TiledMma_{}), "svdq: one thread layout for both MMAs");
  // a low-rank k-tile's bf16 tiles fill exactly the stage buffers they are written into
  static_assert(!LowRankUp || cute::cosize_v<SmemLayoutALR> * 16 == cute::cosize_v<SmemLayoutA> * sizeof_bits_v<RealSwappedElementA>,
                "svdq: L1's bf16 tile must have the bytes of the int4 A tile");
  static_assert(!LowRankUp || cute::cosize_v<SmemLayoutBLR> * 16 == cute::cosize_v<SmemLayoutB> * sizeof_bits_v<RealSwappedElementB>,
                "svdq: lr's bf16 tile must have the bytes of the e4m3 B tile");
  

private:
  static constexpr ConversionMode
  get_conversion_mode() {
    if constexpr (cute::is_void_v<ElementScale>) {
      return ConversionMode::DirectConvert;
    }
    else if constexpr (cute::is_void_v<ElementZero>) {
      return ConversionMode::ConvertAndScale;
    }
    else {
      return ConversionMode::ConvertAndScaleWithZero;
    }
  }

public:
  static constexpr ConversionMode KernelConversionMode = get_conversion_mode();
  static_assert(KernelConversionMode == ConversionMode::ConvertAndScale, "svdq: the group-64 mainloop supports ConvertAndScale only");
  static constexpr bool ModeHasScales = KernelConversionMode == ConversionMode::ConvertAndScale ||
                                        KernelConversionMode == ConversionMode::ConvertAndScaleWithZero;
  static constexpr bool UseScaleLookupTable = KernelConversionMode == ConversionMode::ConvertAndScale &&
                                              cutlass::detail::is_Array_v<ElementScale>;
  static constexpr size_t SmemAlignmentA = cutlass::detail::alignment_for_swizzle(SmemLayoutA{});

  static constexpr size_t SmemAlignmentB = cutlass::detail::alignment_for_swizzle(SmemLayoutB{});

  // Just pick the max alignment of A and B since it is required to be at least 128B
  static constexpr size_t SmemAlignmentScale = cute::max(SmemAlignmentA, SmemAlignmentB);

  static_assert(SmemAlignmentA >= 128 and SmemAlignmentB >= 128, "Require at least 128B alignment");
  static_assert(!LowRankUp || (cutlass::detail::alignment_for_swizzle(SmemLayoutALR{}) <= SmemAlignmentA &&
                               cutlass::detail::alignment_for_swizzle(SmemLayoutBLR{}) <= SmemAlignmentB),
                "svdq: the stage buffers are not aligned for the low-rank tiles' swizzle");

  // svdq: the producer conversion's e4m3 ring (ProducerConvert): ConvertStages slots of TileM x TileK,
  // K-major with the 128-byte swizzle the SS FP8 wgmma reads (TileK = 128 e4m3 = one swizzle row).
  using ElementA8 = cutlass::float_e4m3_t;
  using SmemLayoutA8 = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<ElementA8>{},
      make_shape(shape<0>(TileShape{}), shape<2>(TileShape{}), Int<cute::max(ConvertStages, 1)>{})));
  static_assert(!ProducerConvert || (ScaleLut && PromoteKTiles == 0 && sizeof_bits_v<RealSwappedElementB> == 8 &&
                                     size<2>(TileShape{}) == 128 && !SwapAB),
                "svdq: the producer conversion is for the table-lookup e4m3 kernels with TileK = 128, unpromoted");

  struct SharedStorage
  {
    static constexpr int scale_elements = Utils::elements_per_smem_scale();
    static constexpr int zero_elements = Utils::elements_per_smem_zero();
    struct TensorStorageRs {
      CUTE_ALIGNAS(SmemAlignmentA) cute::ArrayEngine<RealSwappedElementA, cute::cosize_v<SmemLayoutA>> smem_A;
      CUTE_ALIGNAS(SmemAlignmentB) cute::ArrayEngine<typename TiledMma::ValTypeB, cute::cosize_v<SmemLayoutB>> smem_B;
      cute::ArrayEngine<NonVoidElementScale, scale_elements> smem_scale;
      cute::ArrayEngine<NonVoidElementZero, zero_elements> smem_zero;
    };
    struct TensorStorageConvert {
      CUTE_ALIGNAS(SmemAlignmentA) cute::ArrayEngine<RealSwappedElementA, cute::cosize_v<SmemLayoutA>> smem_A;
      CUTE_ALIGNAS(SmemAlignmentB) cute::ArrayEngine<typename TiledMma::ValTypeB, cute::cosize_v<SmemLayoutB>> smem_B;
      CUTE_ALIGNAS(1024) cute::ArrayEngine<ElementA8, cute::cosize_v<SmemLayoutA8>> smem_A8;
      cute::ArrayEngine<NonVoidElementScale, scale_elements> smem_scale;
      cute::ArrayEngine<NonVoidElementZero, zero_elements> smem_zero;
    };
    using TensorStorage = cute::conditional_t<ProducerConvert, TensorStorageConvert, TensorStorageRs>;
    TensorStorage tensors;

    using PipelineStorage = typename MainloopPipeline::SharedStorage;
    PipelineStorage pipeline;
  };
  using TensorStorage = typename SharedStorage::TensorStorage;
  using PipelineStorage = typename SharedStorage::PipelineStorage;

  // Host side kernel arguments
  struct Arguments {
    ElementA const* ptr_A = nullptr;
    StrideA dA{};
    ElementB const* ptr_B = nullptr;
    StrideB dB{};
    ElementScale const* ptr_S = nullptr;
    NonVoidStrideScale dS{};
    int group_size = 0;
    ElementZero const* ptr_Z = nullptr;
    uint32_t mma_promotion_interval = 4;
    // svdq: LowRankUp only. lr: [tokens, 64 * lr_k_tiles] bf16 (k-tile j reads columns 64j..64j+31);
    // L1: [N, 32 * lr_k_tiles] bf16; both row-major with the given leading dimensions.
    ElementLR const* ptr_LR = nullptr;
    int64_t ld_LR = 0;
    ElementLR const* ptr_L1 = nullptr;
    int64_t ld_L1 = 0;
    int lr_k_tiles = 0;
  };

  // Device side kernel params
  struct Params {
  public:

    // Assumption: StrideA is congruent with Problem_MK
    using LayoutA = decltype(detail::get_gmem_layout(repeat_like(SwappedStrideA{}, int32_t(0)), SwappedStrideA{}));
    using LayoutB = decltype(detail::get_gmem_layout(repeat_like(SwappedStrideB{}, int32_t(0)), SwappedStrideB{}));

    using TMA_A = decltype(make_tma_copy_A_sm90<TmaElementA>(
        GmemTiledCopyA{},
        make_tensor(detail::get_logical_ptr(static_cast<SwappedElementA const*>(nullptr)), LayoutA{}),
        SmemLayoutA{}(_,_,cute::Int<0>{}),
        TileShape{},
        ClusterShape{}));  // mcast along N mode for this M load, if any

   using TMA_Scale = decltype(make_tma_copy<TmaElementScale>(
        GmemTiledCopyScale{},
        make_tensor(detail::get_logical_ptr(static_cast<NonVoidElementScale const*>(nullptr)), repeat_like(NonVoidStrideScale{}, int32_t(0)), NonVoidStrideScale{}),
        SmemLayoutScale{}(_,_,cute::Int<0>{}),
        ScaleTileShape{},
        _1{}));  // mcast along N mode for this M load, if any. Scale is ALWAYS loaded with A for RF kernel

   using TMA_Zero = decltype(make_tma_copy(
        GmemTiledCopyScale{},
        make_tensor(detail::get_logical_ptr(static_cast<NonVoidElementZero const*>(nullptr)), repeat_like(NonVoidStrideScale{}, int32_t(0)), NonVoidStrideScale{}),
        SmemLayoutScale{}(_,_,cute::Int<0>{}),
        ScaleTileShape{},
        _1{}));  // mcast along N mode for this M load, if any. Scale is ALWAYS loaded with A for RF kernel

    // Assumption: StrideB is congruent with Problem_NK
    using TMA_B = decltype(make_tma_copy_B_sm90(
        GmemTiledCopyB{},
        make_tensor(detail::get_logical_ptr(static_cast<SwappedElementB const*>(nullptr)), LayoutB{}),
        SmemLayoutB{}(_,_,cute::Int<0>{}),
        TileShape{},
        ClusterShape{})); // mcast along M mode for this N load, if any
    // svdq: the low-rank k-tiles' loads (LowRankUp): L1 like A, lr like B
    using TMA_L1 = decltype(make_tma_copy_A_sm90<uint16_t>(
        GmemTiledCopyA{},
        make_tensor(detail::get_logical_ptr(static_cast<ElementLR const*>(nullptr)), LayoutA{}),
        SmemLayoutALR{}(_,_,cute::Int<0>{}),
        LrTileShapeA{},
        ClusterShape{}));
    using TMA_LR = decltype(make_tma_copy_B_sm90<uint16_t>(
        GmemTiledCopyB{},
        make_tensor(detail::get_logical_ptr(static_cast<ElementLR const*>(nullptr)), LayoutB{}),
        SmemLayoutBLR{}(_,_,cute::Int<0>{}),
        LrTileShapeB{},
        ClusterShape{}));
    TMA_A tma_load_a;
    TMA_B tma_load_b;
    TMA_Scale tma_load_scale;
    TMA_Zero tma_load_zero;
    int64_t scale_k;
    int group_size;
    uint32_t tma_transaction_bytes = TmaTransactionBytes;
    int reload_factor = (group_size + size<2>(TileShape{}) - 1) / size<2>(TileShape{});
    SwappedStrideA dA;
    SwappedStrideB dB;
    TMA_L1 tma_load_l1{};
    TMA_LR tma_load_lr{};
    int lr_k_tiles = 0;
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

    if constexpr (SwapAB) {
      M = get<1>(problem_shape_MNKL);
      N = get<0>(problem_shape_MNKL);
    }

    SwappedElementA const* ptr_A;
    SwappedStrideA dA;
    SwappedElementB const* ptr_B;
    SwappedStrideB dB;

    if constexpr (not SwapAB) {
      ptr_A = reinterpret_cast<SwappedElementA const*>(args.ptr_A);
      ptr_B = reinterpret_cast<SwappedElementB const*>(args.ptr_B);
      dA = args.dA;
      dB = args.dB;
    }
    else {
      ptr_A = reinterpret_cast<SwappedElementA const*>(args.ptr_B);
      ptr_B = reinterpret_cast<SwappedElementB const*>(args.ptr_A);
      dA = args.dB;
      dB = args.dA;
    }

    // svdq: with LowRankUp, K counts lr_k_tiles low-rank k-tiles after the weights' own K
    int const lr_k_tiles = LowRankUp ? args.lr_k_tiles : 0;
    int const K_real = static_cast<int>(K) - lr_k_tiles * static_cast<int>(size<2>(TileShape{}));
    Tensor tensor_a = make_tensor(detail::get_logical_ptr(ptr_A), detail::get_gmem_layout(make_shape(M,K_real,L), dA));
    Tensor tensor_b = make_tensor(detail::get_logical_ptr(ptr_B), detail::get_gmem_layout(make_shape(N,K_real,L), dB));
    typename Params::TMA_L1 tma_load_l1{};
    typename Params::TMA_LR tma_load_lr{};
    if constexpr (LowRankUp) {
      Tensor tensor_l1 = make_tensor(detail::get_logical_ptr(args.ptr_L1),
          detail::get_gmem_layout(make_shape(M, lr_k_tiles * LrK, L), SwappedStrideA{args.ld_L1, _1{}, int64_t(0)}));
      Tensor tensor_lr = make_tensor(detail::get_logical_ptr(args.ptr_LR),
          detail::get_gmem_layout(make_shape(N, lr_k_tiles * LrKB, L), SwappedStrideB{args.ld_LR, _1{}, int64_t(0)}));
      tma_load_l1 = make_tma_copy_A_sm90<uint16_t>(GmemTiledCopyA{}, tensor_l1, SmemLayoutALR{}(_,_,cute::Int<0>{}),
                                                   LrTileShapeA{}, ClusterShape{});
      tma_load_lr = make_tma_copy_B_sm90<uint16_t>(GmemTiledCopyB{}, tensor_lr, SmemLayoutBLR{}(_,_,cute::Int<0>{}),
                                                   LrTileShapeB{}, ClusterShape{});
    }
    typename Params::TMA_A tma_load_a = make_tma_copy_A_sm90<TmaElementA>(
        GmemTiledCopyA{},
        tensor_a,
        SmemLayoutA{}(_,_,cute::Int<0>{}),
        TileShape{},
        ClusterShape{}); // mcast along N mode for this M load, if any

    typename Params::TMA_B tma_load_b = make_tma_copy_B_sm90(
        GmemTiledCopyB{},
        tensor_b,
        SmemLayoutB{}(_,_,cute::Int<0>{}),
        TileShape{},
        ClusterShape{}); // mcast along M mode for this N load, if any

    typename Params::TMA_Scale tma_load_scale{};
    typename Params::TMA_Zero tma_load_zero{};

    uint32_t tma_transaction_bytes = TmaTransactionBytesMK + TmaTransactionBytesNK;
    if constexpr (KernelConversionMode == ConversionMode::DirectConvert) {
      return { tma_load_a, tma_load_b, tma_load_scale, tma_load_zero, 0, 0, tma_transaction_bytes, 1, dA, dB };
    }
    else if constexpr (ModeHasScales) {
      auto scale_k = ceil_div(K, args.group_size);
      ElementScale const* ptr_S = args.ptr_S;
      StrideScale dS = args.dS;
      Tensor tensor_scale = make_tensor(detail::get_logical_ptr(ptr_S), make_layout(make_shape(M,scale_k,L), dS));
      tma_load_scale = make_tma_copy<TmaElementScale>(
          GmemTiledCopyScale{},
          tensor_scale,
          SmemLayoutScale{}(_,_,cute::Int<0>{}),
          ScaleTileShape{},
          _1{}); // mcast along N mode for this M load, if any

      if constexpr(KernelConversionMode == ConversionMode::ConvertAndScale) {
        return { tma_load_a, tma_load_b, tma_load_scale, tma_load_zero, scale_k, args.group_size, tma_transaction_bytes + TmaTransactionBytesExtra, 1 /* svdq: one scale tile per k-tile */, dA, dB,
                 tma_load_l1, tma_load_lr, lr_k_tiles };
      }
      else if constexpr(KernelConversionMode == ConversionMode::ConvertAndScaleWithZero) {
        Tensor tensor_zero = make_tensor(detail::get_logical_ptr(args.ptr_Z), make_layout(make_shape(M,scale_k,L), dS));
        tma_load_zero = make_tma_copy(
            GmemTiledCopyScale{},
            tensor_zero,
            SmemLayoutScale{}(_,_,cute::Int<0>{}),
            ScaleTileShape{},
            _1{}); // mcast along N mode for this M load, if any
        return { tma_load_a, tma_load_b, tma_load_scale, tma_load_zero, scale_k, args.group_size, tma_transaction_bytes + TmaTransactionBytesExtra, 1 /* svdq: one scale tile per k-tile */, dA, dB };
      } else {
        static_assert(cutlass::detail::dependent_false<KernelSchedule>, "Conversion mode not handled in to_underlying_arguments.");
      }
    }
    else {
      static_assert(cutlass::detail::dependent_false<KernelSchedule>, "Conversion mode not handled in to_underlying_arguments.");
    }
  }

  template<class ProblemShape>
  static bool
  can_implement(
      ProblemShape const& problem_shape,
      [[maybe_unused]] Arguments const& args) {
    constexpr int tma_alignment_bits = 128;
    auto problem_shape_MNKL = append<4>(problem_shape, 1);
    auto [M,N,K,L] = problem_shape_MNKL;

    constexpr int min_tma_aligned_elements_A = tma_alignment_bits / cutlass::sizeof_bits<ElementA>::value;
    bool check_aligned_A = cutlass::detail::check_alignment<min_tma_aligned_elements_A>(detail::get_gmem_layout(cute::make_shape(M,K,L), args.dA));

    constexpr int min_tma_aligned_elements_B = tma_alignment_bits / cutlass::sizeof_bits<ElementB>::value;
    bool check_aligned_B = cutlass::detail::check_alignment<min_tma_aligned_elements_B>(detail::get_gmem_layout(cute::make_shape(N,K,L), args.dB));

    bool check_aligned_S = true;
    bool check_aligned_Z = true;
    bool check_mode_args = true;

    if constexpr (KernelConversionMode == ConversionMode::DirectConvert) {
      check_mode_args = check_mode_args && (args.ptr_S == nullptr);
      check_mode_args = check_mode_args && (args.ptr_Z == nullptr);
    }
    else if constexpr (ModeHasScales) {
      const int scale_mn = SwapAB ? N : M;
      const int scale_k = ceil_div(K, args.group_size);
      constexpr int min_tma_aligned_elements_scale = tma_alignment_bits / cutlass::sizeof_bits<ElementScale>::value;
      check_aligned_S = cutlass::detail::check_alignment<min_tma_aligned_elements_scale>(cute::make_shape(scale_mn,scale_k,L), args.dS);
      // svdq: groups of exactly 64, whole k-tiles
      check_mode_args = check_mode_args && args.group_size == ScaleGroupK && (K % size<2>(TileShape{})) == 0;
      check_mode_args = check_mode_args && args.group_size != 0;
      check_mode_args = check_mode_args && (args.ptr_S != nullptr);

      if constexpr (KernelConversionMode == ConversionMode::ConvertAndScale) {
        check_mode_args = check_mode_args && (args.ptr_Z == nullptr);
      }
      else if constexpr (KernelConversionMode == ConversionMode::ConvertAndScaleWithZero) {
        constexpr int min_tma_aligned_elements_zero = tma_alignment_bits / cutlass::sizeof_bits<ElementZero>::value;
        check_aligned_Z = cutlass::detail::check_alignment<min_tma_aligned_elements_zero>(cute::make_shape(scale_mn,scale_k,L), args.dS);
        check_mode_args = check_mode_args && (args.ptr_Z != nullptr);
      }
      else {
        static_assert(cutlass::detail::dependent_false<KernelSchedule>, "Conversion mode not handled in can_implement.");
      }
    }
    else {
      static_assert(cutlass::detail::dependent_false<KernelSchedule>, "Conversion mode not handled in can_implement.");
    }

    if (!check_mode_args) {
      CUTLASS_TRACE_HOST("  CAN IMPLEMENT: Invalid arguments for the selected conversion mode.\n");
    }
    if (!check_aligned_A) {
      CUTLASS_TRACE_HOST("  CAN IMPLEMENT: Tensor A meet the minimum alignment requirements for TMA.\n");
    }
    if (!check_aligned_B) {
      CUTLASS_TRACE_HOST("  CAN IMPLEMENT: Tensor B meet the minimum alignment requirements for TMA.\n");
    }
    if (!check_aligned_S) {
      CUTLASS_TRACE_HOST("  CAN IMPLEMENT: Tensor S (scale) meet the minimum alignment requirements for TMA.\n");
    }
    if (!check_aligned_Z) {
      CUTLASS_TRACE_HOST("  CAN IMPLEMENT: Tensor Z (zeros) meet the minimum alignment requirements for TMA.\n");
    }

    return check_mode_args && check_aligned_A && check_aligned_B && check_aligned_S && check_aligned_Z;
  }

  static constexpr int K_PIPE_MAX = DispatchPolicy::Stages;
  static constexpr uint32_t TmaTransactionBytesMK = Utils::compute_tma_transaction_bytes_mk();
  static constexpr uint32_t TmaTransactionBytesNK = Utils::compute_tma_transaction_bytes_nk();
  static constexpr uint32_t TmaTransactionBytesExtra = Utils::compute_tma_transaction_bytes_extra();
  static constexpr uint32_t TmaTransactionBytes = TmaTransactionBytesMK + TmaTransactionBytesNK + TmaTransactionBytesExtra;

  /// Issue Tma Descriptor Prefetch -- ideally from a single thread for best performance
  CUTLASS_DEVICE
  static void prefetch_tma_descriptors(Params const& mainloop_params) {
    cute::prefetch_tma_descriptor(mainloop_params.tma_load_a.get_tma_descriptor());
    cute::prefetch_tma_descriptor(mainloop_params.tma_load_b.get_tma_descriptor());

    if constexpr (KernelConversionMode == ConversionMode::DirectConvert) {
      // Nothing extra to do
    }
    else if constexpr (KernelConversionMode == ConversionMode::ConvertAndScale) {
      cute::prefetch_tma_descriptor(mainloop_params.tma_load_scale.get_tma_descriptor());
    }
    else if constexpr (KernelConversionMode == ConversionMode::ConvertAndScaleWithZero) {
      cute::prefetch_tma_descriptor(mainloop_params.tma_load_scale.get_tma_descriptor());
      cute::prefetch_tma_descriptor(mainloop_params.tma_load_zero.get_tma_descriptor());
    }
    else {
      static_assert(cutlass::detail::dependent_false<KernelSchedule>, "Conversion mode not handled in TMA prefetch.");
    }

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
    Tensor mA_mkl = mainloop_params.tma_load_a.get_tma_tensor(shape(detail::get_gmem_layout(make_shape(M,K,L), mainloop_params.dA))); // (m,k,l)
    Tensor mB_nkl = mainloop_params.tma_load_b.get_tma_tensor(shape(detail::get_gmem_layout(make_shape(N,K,L), mainloop_params.dB))); // (n,k,l)

    // Make tiled views, defer the slice
    Tensor gA_mkl = local_tile(mA_mkl, TileShape{}, make_coord(_,_,_), Step<_1, X,_1>{});        // (BLK_M,BLK_K,m,k,l)
    Tensor gB_nkl = local_tile(mB_nkl, TileShape{}, make_coord(_,_,_), Step< X,_1,_1>{});        // (BLK_N,BLK_K,n,k,l)

    if constexpr (KernelConversionMode == ConversionMode::DirectConvert) {
      return cute::make_tuple(gA_mkl, gB_nkl);
    }
    else if constexpr (ModeHasScales) {
      auto scale_k = mainloop_params.scale_k;
      Tensor mS_mkl = mainloop_params.tma_load_scale.get_tma_tensor(make_shape(M,scale_k,L));          // (m,scale_k,l)
      Tensor gS_mkl = local_tile(mS_mkl, ScaleTileShape{}, make_coord(_,_));         // (BLK_M,BLK_Scale_K,m,scale_k,l)
      if constexpr (KernelConversionMode == ConversionMode::ConvertAndScale) {
        if constexpr (LowRankUp) {  // svdq: the low-rank k-tiles' coordinates
          int const lr_k_tiles = mainloop_params.lr_k_tiles;
          Tensor mL1 = mainloop_params.tma_load_l1.get_tma_tensor(make_shape(M, lr_k_tiles * LrK, L));    // (m,lrk,l)
          Tensor mLR = mainloop_params.tma_load_lr.get_tma_tensor(make_shape(N, lr_k_tiles * LrKB, L));   // (n,lrk,l)
          Tensor gL1 = local_tile(mL1, LrTileShapeA{}, make_coord(_,_,_), Step<_1, X,_1>{});           // (BLK_M,LrK,m,j,l)
          Tensor gLR = local_tile(mLR, LrTileShapeB{}, make_coord(_,_,_), Step< X,_1,_1>{});           // (BLK_N,LrKB,n,j,l)
          return cute::make_tuple(gA_mkl, gB_nkl, gS_mkl, gL1, gLR);
        }
        else {
          return cute::make_tuple(gA_mkl, gB_nkl, gS_mkl);
        }
      }
      else if constexpr (KernelConversionMode == ConversionMode::ConvertAndScaleWithZero) {
        Tensor mZ_mkl = mainloop_params.tma_load_zero.get_tma_tensor(make_shape(M,scale_k,L));         // (m,scale_k,l)
        Tensor gZ_mkl = local_tile(mZ_mkl, ScaleTileShape{}, make_coord(_,_));       // (BLK_M,BLK_Scale_K,m,scale_k,l)
        return cute::make_tuple(gA_mkl, gB_nkl, gS_mkl, gZ_mkl);
      }
      else {
        static_assert(cutlass::detail::dependent_false<KernelSchedule>, "Conversion mode not handled in load_init.");
      }
    }
    else {
      static_assert(cutlass::detail::dependent_false<KernelSchedule>, "Conversion mode not handled in load_init.");
    }
  }

  /// Perform a collective-scoped matrix multiply-accumulate
  /// Producer Perspective
  /// This overload gets triggered when we have scales.
  template <
    class... Ts,
    class KTileIterator, class BlockCoord
  >
  CUTLASS_DEVICE void
  load(
      Params const& mainloop_params,
      MainloopPipeline pipeline,
      PipelineState smem_pipe_write,
      cute::tuple<Ts...> const& load_inputs,
      BlockCoord const& blk_coord,
      KTileIterator k_tile_iter, int k_tile_count,
      int thread_idx,
      uint32_t block_rank_in_cluster,
      TensorStorage& shared_tensors) {
    if constexpr (KernelConversionMode == ConversionMode::DirectConvert) {
      static_assert(sizeof... (Ts) == 2, "Direct convert needs two inputs");
    }
    else if constexpr (KernelConversionMode == ConversionMode::ConvertAndScale) {
      static_assert(sizeof... (Ts) == (LowRankUp ? 5 : 3), "Scaled convert needs three inputs (five with the low-rank k-tiles)");
    }
    else if constexpr (KernelConversionMode == ConversionMode::ConvertAndScaleWithZero) {
      static_assert(sizeof... (Ts) == 4, "Scaled and zero convert needs four inputs");
    }
    else {
      static_assert(cutlass::detail::dependent_false<KernelSchedule>, "Conversion mode not handled in TMA load.");
    }

    Tensor sA_ = make_tensor(make_smem_ptr(shared_tensors.smem_A.begin()), SmemLayoutA{});      // (BLK_M,BLK_K,PIPE)
    Tensor sB_ = make_tensor(make_smem_ptr(shared_tensors.smem_B.begin()), SmemLayoutB{});      // (BLK_N,BLK_K,PIPE)
    Tensor sA  = as_position_independent_swizzle_tensor(sA_);                                   // (BLK_M,BLK_K,PIPE)
    Tensor sB  = as_position_independent_swizzle_tensor(sB_);                                   // (BLK_N,BLK_K,PIPE)

    //
    // Prepare the TMA loads for A, B and Scales
    //

    constexpr uint32_t cluster_shape_x = get<0>(ClusterShape());
    uint2 cluster_local_block_id = {block_rank_in_cluster % cluster_shape_x, block_rank_in_cluster / cluster_shape_x};

    Tensor gA_mkl = get<0>(load_inputs);
    Tensor gB_nkl = get<1>(load_inputs);

    auto block_tma_a = mainloop_params.tma_load_a.get_slice(cluster_local_block_id.y);
    auto block_tma_b = mainloop_params.tma_load_b.get_slice(cluster_local_block_id.x);

    // Partition the inputs based on the current block coordinates.
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor gA = gA_mkl(_,_,m_coord,_,l_coord);                                                     // (BLK_M,BLK_K,k)
    Tensor gB = gB_nkl(_,_,n_coord,_,l_coord);                                                     // (BLK_N,BLK_K,k)

    // Applies the mapping from block_tma_a
    Tensor tAgA = block_tma_a.partition_S(gA);                                                 // (TMA,TMA_M,TMA_K,k)
    Tensor tAsA = block_tma_a.partition_D(sA);                                              // (TMA,TMA_M,TMA_K,PIPE)

    Tensor tBgB = block_tma_b.partition_S(gB);                                                 // (TMA,TMA_N,TMA_K,k)
    Tensor tBsB = block_tma_b.partition_D(sB);                                              // (TMA,TMA_N,TMA_K,PIPE)

    uint16_t mcast_mask_a = 0;
    uint16_t mcast_mask_b = 0;
    uint16_t mcast_mask_s = 0;

    // Issue TmaLoads
    // Maps the tile -> block, value
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<typename DispatchPolicy::ClusterShape>{};                       // (m,n) -> block_id
      for (int n = 0; n < size<1>(block_layout); ++n) {
        mcast_mask_a |= (uint16_t(1) << block_layout(cluster_local_block_id.x,n,Int<0>{}));
      }
    }

    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<typename DispatchPolicy::ClusterShape>{};                       // (m,n) -> block_id
      for (int m = 0; m < size<0>(block_layout); ++m) {
        mcast_mask_b |= (uint16_t(1) << block_layout(m,cluster_local_block_id.y,Int<0>{}));
      }
    }

    auto extra_input_partitions = Utils::partition_extra_tma_inputs(mainloop_params, load_inputs, shared_tensors, cluster_local_block_id, m_coord, l_coord);
    // svdq: the low-rank k-tiles' partitions: L1 into the A buffers, lr into the B buffers
    auto lr_partitions = lr_load_partitions(mainloop_params, load_inputs, shared_tensors, cluster_local_block_id,
                                            m_coord, n_coord, l_coord);
    int const k_tiles_real = LowRankUp ? static_cast<int>(size<3>(gA_mkl)) - mainloop_params.lr_k_tiles : 0;

    // Mainloop
    CUTLASS_PRAGMA_NO_UNROLL
    for ( ; k_tile_count > 0; --k_tile_count) {
      // LOCK smem_pipe_write for _writing_
      pipeline.producer_acquire(smem_pipe_write);

      //
      // Copy gmem to smem for *k_tile_iter
      //

      using BarrierType = typename MainloopPipeline::ProducerBarrierType;
      BarrierType* tma_barrier = pipeline.producer_get_barrier(smem_pipe_write);

      int write_stage = smem_pipe_write.index();
      if (cute::elect_one_sync()) {
        bool lr_tile = false;
        if constexpr (LowRankUp) {
          int const j = *k_tile_iter - k_tiles_real;
          if (j >= 0) {  // svdq: a low-rank k-tile: the same bytes per stage as an FP8 one
            lr_tile = true;
            copy(mainloop_params.tma_load_l1.with(*tma_barrier, mcast_mask_a), get<0>(lr_partitions)(_,_,_,j), get<1>(lr_partitions)(_,_,_,write_stage));
            copy(mainloop_params.tma_load_lr.with(*tma_barrier, mcast_mask_b), get<2>(lr_partitions)(_,_,_,j), get<3>(lr_partitions)(_,_,_,write_stage));
          }
        }
        if (!lr_tile) {
          copy(mainloop_params.tma_load_a.with(*tma_barrier, mcast_mask_a), tAgA(_,_,_,*k_tile_iter), tAsA(_,_,_,write_stage));
          copy(mainloop_params.tma_load_b.with(*tma_barrier, mcast_mask_b), tBgB(_,_,_,*k_tile_iter), tBsB(_,_,_,write_stage));
        }
      }

      if constexpr (KernelConversionMode == ConversionMode::DirectConvert) {
        // Nothing extra to do.
      }
      else if constexpr (ModeHasScales) {
        auto tSgS = get<0>(extra_input_partitions);
        auto tSsS = get<1>(extra_input_partitions);

        // Temporary factor which will determine which k tile to reload from gmem. Needed so we don't modify tma transaction bytes
        // on the fly.
        // We must do a ceiling divide here to correctly handle with group_size == K. In that case, we don't require that K
        // is a multiple of the threadblock tile K
        int const scale_load_k = *k_tile_iter / mainloop_params.reload_factor; // This will always be 0 when group_size == K.
        if (cute::elect_one_sync()) copy(mainloop_params.tma_load_scale.with(*tma_barrier, mcast_mask_s), tSgS(_,_,_,scale_load_k), tSsS(_,_,_,write_stage));

        if constexpr (KernelConversionMode == ConversionMode::ConvertAndScale) {
          // Nothing extra to do
        }
        else if constexpr (KernelConversionMode == ConversionMode::ConvertAndScaleWithZero) {
          auto tZgZ = get<2>(extra_input_partitions);
          auto tZsZ = get<3>(extra_input_partitions);
          if (cute::elect_one_sync()) copy(mainloop_params.tma_load_zero.with(*tma_barrier, mcast_mask_s), tZgZ(_,_,_,scale_load_k), tZsZ(_,_,_,write_stage));
        }
        else {
          static_assert(cutlass::detail::dependent_false<KernelSchedule>, "Conversion mode not handled for TMA copy op.");
        }
      }
      else {
        static_assert(cutlass::detail::dependent_false<KernelSchedule>, "Conversion mode not handled for TMA copy op.");
      }

      ++k_tile_iter;

      // Advance smem_pipe_write
      ++smem_pipe_write;
    }
  }

  // svdq: (tL1g, tL1s, tLRg, tLRs): the low-rank k-tiles' TMA partitions (LowRankUp; else empty)
  template <class LoadInputs, class BlockId, class MCoord, class NCoord, class LCoord>
  CUTLASS_DEVICE static auto
  lr_load_partitions(Params const& mainloop_params, LoadInputs const& load_inputs, TensorStorage& shared_tensors,
                     BlockId const& cluster_local_block_id, MCoord const& m_coord, NCoord const& n_coord,
                     LCoord const& l_coord) {
    if constexpr (LowRankUp) {
      Tensor sL1 = as_position_independent_swizzle_tensor(
          make_tensor(make_smem_ptr(reinterpret_cast<ElementLR*>(&shared_tensors.smem_A)), SmemLayoutALR{}));  // (BLK_M,LrK,PIPE)
      Tensor sLR = as_position_independent_swizzle_tensor(
          make_tensor(make_smem_ptr(reinterpret_cast<ElementLR*>(&shared_tensors.smem_B)), SmemLayoutBLR{}));  // (BLK_N,LrKB,PIPE)
      auto block_tma_l1 = mainloop_params.tma_load_l1.get_slice(cluster_local_block_id.y);
      auto block_tma_lr = mainloop_params.tma_load_lr.get_slice(cluster_local_block_id.x);
      Tensor gL1 = get<3>(load_inputs)(_,_,m_coord,_,l_coord);                                    // (BLK_M,LrK,j)
      Tensor gLR = get<4>(load_inputs)(_,_,n_coord,_,l_coord);                                    // (BLK_N,LrKB,j)
      return cute::make_tuple(block_tma_l1.partition_S(gL1), block_tma_l1.partition_D(sL1),
                              block_tma_lr.partition_S(gLR), block_tma_lr.partition_D(sLR));
    }
    else {
      return cute::make_tuple();
    }
  }

  /// Perform a Producer Epilogue to prevent early exit of blocks in a Cluster
  CUTLASS_DEVICE void
  load_tail(MainloopPipeline pipeline, PipelineState smem_pipe_write) {
    // Issue the epilogue waits
    if (cute::elect_one_sync()) {
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
    static_assert(cute::rank(SwappedSmemLayoutAtomA{}) == 2, "SwappedSmemLayoutAtomA must be rank 2.");
    static_assert(cute::rank(SwappedSmemLayoutAtomB{}) == 2, "SwappedSmemLayoutAtomB must be rank 2.");
    static_assert(!cute::is_void_v<SwappedSmemCopyAtomA>,
      "SM90 GMMA mainloops must specify a non-void copy atom for RF sourced instructions.");
    static_assert(cute::is_void_v<SwappedSmemCopyAtomB>,
      "SM90 GMMA mainloops cannot have a non-void copy atom for smem sourced instructions.");

    // Obtain warp index
    int warp_idx = canonical_warp_idx_sync();
    [[maybe_unused]] int warp_group_thread_idx = thread_idx % 128;

    Tensor sA_ = make_tensor(make_smem_ptr(shared_tensors.smem_A.begin()), SmemLayoutA{});        // (BLK_M,BLK_K,PIPE)
    Tensor sA = as_position_independent_swizzle_tensor(sA_);                                      // (BLK_M,BLK_K,PIPE)

    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.begin()), SmemLayoutB{});         // (BLK_N,BLK_K,PIPE)

    //
    // Define C accumulators and A/B partitioning
    //

    // Layout of warp group to thread mapping

    static_assert(stride<0>(typename TiledMma::BLayout{}) == 0 and
                  size<0>(typename TiledMma::BLayout{}) == NumThreadsPerWarpGroup,
                  "Stride of the first mode must be 0 and the size of the mode must be NumThreadsPerWarpGroup");

    constexpr int MmaWarpGroups = size(TiledMma{}) / NumThreadsPerWarpGroup;
    Layout warp_group_thread_layout = make_layout(Int<MmaWarpGroups>{},
                                                  Int<NumThreadsPerWarpGroup>{});

    int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / NumThreadsPerWarpGroup, 0);

    TiledMma tiled_mma;
    auto mma_thread_slice = tiled_mma.get_thread_slice(thread_idx);
    Tensor tCsA = mma_thread_slice.partition_A(sA);
    auto mma_warpgroup_slice = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));

    // Allocate fragments and descriptors
    Tensor tCrA_mma = mma_thread_slice.partition_fragment_A(sA(_,_,Int<0>{}));                // (MMA,MMA_M,MMA_K,PIPE)

    Tensor tCrA_load = [&]{
      if constexpr (not is_layout<SwappedStrideA>::value) {
        // Make register tensor with MMA layout
        return make_fragment_like<RealSwappedElementA>(tCrA_mma);
      }
      else {
        // Make register tensor matching smem layout, converter will take care of de-swizzling
        return make_tensor_like<RealSwappedElementA>(tCsA(_,_,_,Int<0>{}));
      }
    }();

    Tensor tCsB = mma_warpgroup_slice.partition_B(sB);                                        // (MMA,MMA_N,MMA_K,PIPE)
    Tensor tCrB = mma_warpgroup_slice.make_fragment_B(tCsB);                                  // (MMA,MMA_N,MMA_K,PIPE)

    //
    // Copy Atom A retiling
    //
    auto smem_tiled_copy_A = make_tiled_copy_A(SwappedSmemCopyAtomA{}, tiled_mma);
    auto smem_thr_copy_A   = smem_tiled_copy_A.get_thread_slice(warp_group_thread_idx);

    Tensor tCrA_copy_view  = smem_thr_copy_A.retile_D(tCrA_load);                                  // (CPY,CPY_M,CPY_K)

    // Partition of thread -> shared and thread -> RF
    auto partitioned_extra_info = Utils::partition_extra_mma_info(mma_thread_slice, shared_tensors);
    auto copy_partitions_extra_info = Utils::retile_extra_mma_info(tiled_mma, partitioned_extra_info, warp_group_thread_idx);

    CUTE_STATIC_ASSERT_V(size<1>(tCsA) == size<1>(tCrA_copy_view));                                            // CPY_M
    CUTE_STATIC_ASSERT_V(size<2>(tCsA) == size<2>(tCrA_copy_view));                                            // CPY_K
    CUTE_STATIC_ASSERT_V(size<1>(tCrA_mma) == size<1>(accum));                                                 // MMA_M
    CUTE_STATIC_ASSERT_V(size<1>(tCsB) == size<2>(accum));                                                         // N
    CUTE_STATIC_ASSERT_V(size<2>(tCsA) == size<2>(tCsB));                                                          // K
    CUTE_STATIC_ASSERT_V(size<3>(tCsA) == size<3>(tCsB));                                                       // PIPE
    CUTE_STATIC_ASSERT_V(Int<DispatchPolicy::Stages>{} == size<2>(sA));                                         // PIPE
    CUTE_STATIC_ASSERT_V(Int<DispatchPolicy::Stages>{} == size<2>(sB));                                         // PIPE

    //
    // PIPELINED MAIN LOOP
    //

    // We release buffers to producer warps(dma load) with some mmas in flight
    PipelineState smem_pipe_release = smem_pipe_read;

    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;

    // svdq: optional promotion of the FP8 partial sums into accum (see PromoteKTiles).
    constexpr bool Promote = PromoteKTiles > 0;
    Tensor accum_tmp = make_fragment_like(accum);
    if constexpr (Promote) {
      clear(accum);
    }
    int promote_count = 0;
    // svdq: the low-rank k-tiles (LowRankUp): bf16 SS MMAs on the stage's L1 and lr tiles
    TiledMmaLR tiled_mma_lr;
    auto lr_fragments = lr_mma_fragments(tiled_mma_lr, warp_group_thread_layout(warp_group_idx), shared_tensors);
    auto is_lr_tile = [&](int stage) {
      if constexpr (LowRankUp) {
        auto const* scales = reinterpret_cast<uint16_t const*>(&shared_tensors.smem_scale);
        return scales[SmemLayoutScale{}(0, 0, stage)] == LrScaleSentinel;
      }
      else {
        return false;
      }
    };
    auto mma_block = [&](int k_block, int stage, bool lr_tile) {
      if constexpr (LowRankUp) {
        if (lr_tile) {
          if (k_block < LrKBlocks) {
            tiled_mma_lr.accumulate_ = tiled_mma.accumulate_;
            cute::gemm(tiled_mma_lr, get<0>(lr_fragments)(_,_,k_block,stage), get<1>(lr_fragments)(_,_,k_block,stage), accum);
          }
          return;
        }
      }
      if constexpr (Promote) {
        cute::gemm(tiled_mma, tCrA_mma(_,_,k_block), tCrB(_,_,k_block,stage), accum_tmp);
      } else {
        cute::gemm(tiled_mma, tCrA_mma(_,_,k_block), tCrB(_,_,k_block,stage), accum);
      }
    };
    auto promote = [&](bool last) {
      if constexpr (Promote) {
        if (++promote_count == PromoteKTiles || last) {
          warpgroup_wait<0>();
          warpgroup_fence_operand(accum_tmp);
          warpgroup_fence_operand(accum);
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < size(accum); ++i) {
            accum(i) += accum_tmp(i);
          }
          warpgroup_fence_operand(accum);
          tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
          promote_count = 0;
        }
      }
    };

    warpgroup_fence_operand(accum);

    constexpr int K_BLOCK_MAX = size<2>(tCrA_load);
    constexpr int K_WAIT_MAX = cute::min(K_BLOCK_MAX - 1, 7);
    static_assert(K_BLOCK_MAX >= 4, "Consider increasing TileShapeK");

    ConsumerToken barrier_token = {BarrierStatus::WaitAgain};
    // first k tile
    {
      barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, barrier_token);

      int read_stage = smem_pipe_read.index();
      bool const lr_tile = is_lr_tile(read_stage);

      ++smem_pipe_read;
      barrier_token = pipeline.consumer_try_wait(smem_pipe_read);

      // copy smem->rmem for A operand
      Utils::copy_tensors_MK(smem_tiled_copy_A, tCsA, tCrA_copy_view,
        partitioned_extra_info, copy_partitions_extra_info, 0, read_stage);
      if (K_BLOCK_MAX > 1) { // prefetch next block
        Utils::copy_tensors_MK(smem_tiled_copy_A, tCsA, tCrA_copy_view,
          partitioned_extra_info, copy_partitions_extra_info, 1, read_stage);
      }
      Utils::dequantize_A_kblock(tCrA_load, tCrA_mma, partitioned_extra_info, 0);

      // Unroll the K mode manually to set scale D to 1
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < K_BLOCK_MAX; ++k_block) {
        warpgroup_arrive();
        // (V,M) x (V,N) => (V,M,N)
        mma_block(k_block, read_stage, lr_tile);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
        warpgroup_commit_batch();

        if (k_block < K_BLOCK_MAX - 2) { // prefetch next block
          Utils::copy_tensors_MK(smem_tiled_copy_A, tCsA, tCrA_copy_view,
            partitioned_extra_info, copy_partitions_extra_info, k_block + 2, read_stage);
        }
        if (k_block < K_BLOCK_MAX - 1) {
          Utils::dequantize_A_kblock(tCrA_load, tCrA_mma, partitioned_extra_info, k_block + 1);
        }
      }

      promote(k_tile_count == 1);
      --k_tile_count;
      if (k_tile_count > 0) {
        // Wait for K_BLOCK_MAX - 1 to be in flight to ensure that it is safe to overwrite the A registers for the first mma.
        pipeline.consumer_wait(smem_pipe_read, barrier_token);
        Utils::copy_tensors_MK(smem_tiled_copy_A, tCsA, tCrA_copy_view,
          partitioned_extra_info, copy_partitions_extra_info, 0, smem_pipe_read.index());
        if (K_BLOCK_MAX > 1) { // prefetch next block
          Utils::copy_tensors_MK(smem_tiled_copy_A, tCsA, tCrA_copy_view,
            partitioned_extra_info, copy_partitions_extra_info, 1, smem_pipe_read.index());
        }
        warpgroup_wait<K_WAIT_MAX>();
        Utils::dequantize_A_kblock(tCrA_load, tCrA_mma, partitioned_extra_info, 0);
      }
    }

    if (k_tile_count == 0) {
      return;
    }

    warpgroup_fence_operand(accum);
    // Mainloop GMMAs
    CUTLASS_PRAGMA_NO_UNROLL
    for ( ; k_tile_count > 1; --k_tile_count) {

      //
      // Compute on k_tile
      //

      int read_stage = smem_pipe_read.index();
      bool const lr_tile = is_lr_tile(read_stage);
      ++smem_pipe_read;

      warpgroup_fence_operand(accum);
      // Unroll the K mode manually to set scale D to 1
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < K_BLOCK_MAX; ++k_block) {

        warpgroup_arrive();
        // (V,M) x (V,N) => (V,M,N)
        mma_block(k_block, read_stage, lr_tile);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
        warpgroup_commit_batch();

        warpgroup_wait<K_WAIT_MAX>(); // We have K_BLOCK_MAX - 1 GMMA instructions pending for this stage, so we can release prior barrier
        if (k_block == K_BLOCK_MAX - 1) {
          pipeline.consumer_release(smem_pipe_release);             // UNLOCK smem_pipe_release, done _computing_ on it
          ++smem_pipe_release;
        }

        if (k_block == 0) {
          barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
        }

        if (k_block == K_BLOCK_MAX - 1) {
          pipeline.consumer_wait(smem_pipe_read, barrier_token);
          Utils::copy_tensors_MK(smem_tiled_copy_A, tCsA, tCrA_copy_view,
            partitioned_extra_info, copy_partitions_extra_info, 0, smem_pipe_read.index());
          if (K_BLOCK_MAX > 1) { // prefetch next block
            Utils::copy_tensors_MK(smem_tiled_copy_A, tCsA, tCrA_copy_view,
              partitioned_extra_info, copy_partitions_extra_info, 1, smem_pipe_read.index());
          }
          Utils::dequantize_A_kblock(tCrA_load, tCrA_mma, partitioned_extra_info, 0);
        }
        else {
          if (k_block < K_BLOCK_MAX - 2) { // prefetch next block
            Utils::copy_tensors_MK(smem_tiled_copy_A, tCsA, tCrA_copy_view,
              partitioned_extra_info, copy_partitions_extra_info, k_block + 2, read_stage);
          }
          Utils::dequantize_A_kblock(tCrA_load, tCrA_mma, partitioned_extra_info, k_block + 1);
        }
      }
      warpgroup_fence_operand(accum);
      promote(false);
    }

    warpgroup_fence_operand(accum);

    {
      //
      // Compute on k_tile
      //

      int read_stage = smem_pipe_read.index();
      bool const lr_tile = is_lr_tile(read_stage);

      warpgroup_fence_operand(accum);

      // Unroll the K mode manually to set scale D to 1
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < K_BLOCK_MAX; ++k_block) {

        warpgroup_arrive();
        // (V,M) x (V,N) => (V,M,N)
        mma_block(k_block, read_stage, lr_tile);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
        warpgroup_commit_batch();

        warpgroup_wait<K_WAIT_MAX>();
        if (k_block == K_BLOCK_MAX - 1) { // release prior barrier
          pipeline.consumer_release(smem_pipe_release);             // UNLOCK smem_pipe_release, done _computing_ on it
          ++smem_pipe_release;
        }

        if (k_block < K_BLOCK_MAX - 2) { // prefetch next block
          Utils::copy_tensors_MK(smem_tiled_copy_A, tCsA, tCrA_copy_view,
            partitioned_extra_info, copy_partitions_extra_info, k_block + 2, read_stage);
        }
        if (k_block < K_BLOCK_MAX - 1) {
          Utils::dequantize_A_kblock(tCrA_load, tCrA_mma, partitioned_extra_info, k_block + 1);
        }
      }
      promote(true);
    }

    warpgroup_fence_operand(accum);
  }

  // svdq: (A descriptors, B descriptors) of the low-rank k-tiles' bf16 SS MMAs (LowRankUp; else empty)
  template <class WarpGroupThread>
  CUTLASS_DEVICE static auto
  lr_mma_fragments(TiledMmaLR const& tiled_mma_lr, WarpGroupThread const& warp_group_thread, TensorStorage& shared_tensors) {
    if constexpr (LowRankUp) {
      Tensor sL1 = make_tensor(make_smem_ptr(reinterpret_cast<ElementLR*>(&shared_tensors.smem_A)), SmemLayoutALR{});  // (BLK_M,LrK,PIPE)
      Tensor sLR = make_tensor(make_smem_ptr(reinterpret_cast<ElementLR*>(&shared_tensors.smem_B)), SmemLayoutBLR{});  // (BLK_N,LrKB,PIPE)
      auto wg_mma = tiled_mma_lr.get_slice(warp_group_thread);
      return cute::make_tuple(wg_mma.make_fragment_A(wg_mma.partition_A(sL1)),                 // (MMA,MMA_M,LrK/16,PIPE)
                              wg_mma.make_fragment_B(wg_mma.partition_B(sLR)));                // (MMA,MMA_N,LrKB/16,PIPE)
    }
    else {
      return cute::make_tuple();
    }
  }

  // ---------------------------------------------------------------------------------------------
  // svdq: the producer conversion (ProducerConvert; kernel: svdq_sm90_gemm_producer_convert.hpp)
  // ---------------------------------------------------------------------------------------------

  // Per converted slot: "full" (the converter threads arrive once their bytes are fenced) and
  // "empty" (every MMA thread arrives once its wgmmas on the slot have completed).
  struct ConvertStorage {
    cutlass::arch::ClusterBarrier full[cute::max(ConvertStages, 1)];
    cutlass::arch::ClusterBarrier empty[cute::max(ConvertStages, 1)];
  };
  using ConvertPipelineState = cutlass::PipelineState<cute::max(ConvertStages, 1)>;
  // the SS FP8 MMA of the consumers: the stock tiled MMA's warpgroup layout, A and B from smem
  using TiledMmaSS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<ElementA8, RealSwappedElementB, ElementAccumulator, TileShape, GMMA::Major::K, GMMA::Major::K>(),
      Layout<Shape<Int<size(TiledMma_{}) / NumThreadsPerWarpGroup>, _1, _1>>{}));
  static_assert(!ProducerConvert || size(TiledMmaSS{}) == size(TiledMma_{}), "svdq: one thread layout for both MMAs");

  // The converter reads 32 int4 codes of a row as one 16-byte chunk of the int4 tile and writes
  // them as two 16-byte chunks of the e4m3 slot. A swizzled smem layout's swizzle acts on byte
  // addresses (cute's swizzle_ptr; the TMA's swizzle modes), so a byte offset is the swizzle of
  // the unswizzled layout's element offset times the element's bytes. Both swizzles move whole
  // 16-byte units (base 2^4), so a chunk stays contiguous when the unswizzled layout keeps its run
  // contiguous and aligned: checked at the chunks' ends and middles, every row and chunk.
  template <class SmemLayout, int Bits>
  CUTLASS_HOST_DEVICE static constexpr int smem_byte_offset(int m, int k, int stage) {
    return SmemLayout{}.layout_a()(int(SmemLayout{}.layout_b()(m, k, stage)) * Bits / 8);
  }
  static constexpr bool convert_chunks_contiguous() {
    using SwizzleA = decltype(SmemLayoutA{}.layout_a());
    using SwizzleA8 = decltype(SmemLayoutA8{}.layout_a());
    if (SwizzleA::num_base < 4 || SwizzleA8::num_base < 4) {
      return false;
    }
    for (int m = 0; m < size<0>(TileShape{}); ++m) {
      for (int k0 = 0; k0 < size<2>(TileShape{}); k0 += 32) {
        int const a = SmemLayoutA{}.layout_b()(m, k0, 0);
        if (a % 32 != 0 || int(SmemLayoutA{}.layout_b()(m, k0 + 1, 0)) != a + 1 ||
            int(SmemLayoutA{}.layout_b()(m, k0 + 16, 0)) != a + 16 || int(SmemLayoutA{}.layout_b()(m, k0 + 31, 0)) != a + 31) {
          return false;
        }
      }
      for (int k0 = 0; k0 < size<2>(TileShape{}); k0 += 16) {
        int const b = SmemLayoutA8{}.layout_b()(m, k0, 0);
        if (b % 16 != 0 || int(SmemLayoutA8{}.layout_b()(m, k0 + 1, 0)) != b + 1 ||
            int(SmemLayoutA8{}.layout_b()(m, k0 + 15, 0)) != b + 15) {
          return false;
        }
      }
    }
    return true;
  }
  static_assert(!ProducerConvert || convert_chunks_contiguous(), "svdq: the converter's 16-byte chunks are not contiguous");

  /// One thread initialises the converted ring's barriers (before the kernel's block-wide sync).
  CUTLASS_DEVICE static void
  init_convert_barriers(ConvertStorage& storage, uint32_t convert_threads, uint32_t mma_threads) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < ConvertStages; ++i) {
      storage.full[i].init(convert_threads);
      storage.empty[i].init(mma_threads);
    }
    cutlass::arch::fence_barrier_init();
  }

  /// The consumers' slot of the converted ring for a TMA pipeline position: both walk the same
  /// k-tiles, so slot = count mod ConvertStages (phase: its parity of wraps).
  CUTLASS_DEVICE static ConvertPipelineState
  convert_read_state(uint32_t count) {
    constexpr uint32_t C = cute::max(ConvertStages, 1);
    return ConvertPipelineState(static_cast<int>(count % C), (count / C) & 1u, count);
  }

  /// The converter threads' loop over one work tile's k-tiles: wait for the stage's TMA bytes and
  /// a free converted slot, write e4m3(fp16(code * scale)) by the table lookup (the consumers'
  /// SvdqGroup64Utils::make_lut / lut4: the same bytes), fence, arrive. A low-rank k-tile has no
  /// int4 tile (its L1 is in the A buffer, read by the consumers' bf16 MMAs): nothing converted.
  CUTLASS_DEVICE void
  convert(MainloopPipeline pipeline, PipelineState tma_state, ConvertPipelineState conv_state,
          int k_tile_count, int convert_thread_idx, int convert_threads,
          TensorStorage& shared_tensors, ConvertStorage& conv) {
    static_assert(ProducerConvert, "svdq: convert() is the producer conversion's");
    constexpr int TileM = size<0>(TileShape{});
    constexpr int Units = TileM * ScaleColsPerTile;  // (row, 64-group) pairs of a k-tile
    auto const* a_bytes = reinterpret_cast<uint8_t const*>(&shared_tensors.smem_A);
    auto* a8_bytes = reinterpret_cast<uint8_t*>(&shared_tensors.smem_A8);
    auto const* scales = reinterpret_cast<cutlass::half_t const*>(&shared_tensors.smem_scale);
    CUTLASS_PRAGMA_NO_UNROLL
    for ( ; k_tile_count > 0; --k_tile_count) {
      int const stage = tma_state.index();
      int const slot = conv_state.index();
      pipeline.consumer_wait(tma_state);
      conv.empty[slot].wait(conv_state.phase());
      bool lr_tile = false;
      if constexpr (LowRankUp) {
        lr_tile = reinterpret_cast<uint16_t const*>(scales)[SmemLayoutScale{}(0, 0, stage)] == LrScaleSentinel;
      }
      if (!lr_tile && !SVDQ_CONVERT_PROBE) {
        CUTLASS_PRAGMA_NO_UNROLL
        for (int u = convert_thread_idx; u < Units; u += convert_threads) {
          int const m = u % TileM;   // consecutive threads, consecutive rows: no bank conflicts
          int const g = u / TileM;   // (both swizzles spread 8 rows over 8 distinct 16-byte chunks)
          auto const lut = Utils::make_lut(scales[SmemLayoutScale{}(m, g, stage)]);
          CUTLASS_PRAGMA_UNROLL
          for (int h = 0; h < 2; ++h) {  // 32 codes: one 16-byte chunk of the int4 tile
            int const k0 = g * ScaleGroupK + h * 32;
            uint4 const w = *reinterpret_cast<uint4 const*>(
                a_bytes + smem_byte_offset<SmemLayoutA, sizeof_bits_v<RealSwappedElementA>>(m, k0, stage));
            uint32_t const words[4] = {w.x, w.y, w.z, w.w};
            uint32_t out[8];
            CUTLASS_PRAGMA_UNROLL
            for (int i = 0; i < 4; ++i) {  // the consumer conversion's selector math, codes 8i..8i+7
              uint32_t const idx = words[i] & 0x77777777u;
              uint32_t const sel = ((words[i] & 0x88888888u) | 0x64206420u) >> 1;
              out[2 * i] = Utils::lut4(idx, sel, lut);
              out[2 * i + 1] = Utils::lut4(idx >> 16, sel >> 16, lut);
            }
            // 32 e4m3 bytes: two 16-byte chunks of the swizzled K-major slot
            *reinterpret_cast<uint4*>(a8_bytes + smem_byte_offset<SmemLayoutA8, 8>(m, k0, slot)) =
                make_uint4(out[0], out[1], out[2], out[3]);
            *reinterpret_cast<uint4*>(a8_bytes + smem_byte_offset<SmemLayoutA8, 8>(m, k0 + 16, slot)) =
                make_uint4(out[4], out[5], out[6], out[7]);
          }
        }
      }
      cutlass::arch::fence_view_async_shared();  // generic-proxy writes -> the wgmmas' async proxy
      conv.full[slot].arrive();
      ++tma_state;
      ++conv_state;
    }
  }

  /// The consumers with the producer conversion: per k-tile wait for the TMA stage (B) and the
  /// converted slot (A), then SS wgmmas (FP8: 4 k-blocks of K = 32; a low-rank k-tile: 2 bf16
  /// k-blocks of K = 16 on the stage's L1 and lr) in the order the RS mainloop issues them. One
  /// k-tile of MMAs stays in flight; the previous one's TMA stage and slot are then released.
  template <class FrgTensorC>
  CUTLASS_DEVICE void
  mma_converted(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum, int k_tile_count,
                int thread_idx, TensorStorage& shared_tensors, ConvertStorage& conv) {
    static_assert(ProducerConvert, "svdq: mma_converted() is the producer conversion's");
    static_assert(is_rmem<FrgTensorC>::value, "C tensor must be rmem resident.");
    constexpr int MmaWarpGroups = size(TiledMma{}) / NumThreadsPerWarpGroup;
    Layout warp_group_thread_layout = make_layout(Int<MmaWarpGroups>{}, Int<NumThreadsPerWarpGroup>{});
    int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / NumThreadsPerWarpGroup, 0);

    Tensor sA8 = make_tensor(make_smem_ptr(shared_tensors.smem_A8.begin()), SmemLayoutA8{});   // (BLK_M,BLK_K,SLOT)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.begin()), SmemLayoutB{});      // (BLK_N,BLK_K,PIPE)
    TiledMmaSS tiled_mma;
    auto wg_mma = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));
    Tensor tCrA = wg_mma.make_fragment_A(wg_mma.partition_A(sA8));                              // (MMA,MMA_M,MMA_K,SLOT)
    Tensor tCrB = wg_mma.make_fragment_B(wg_mma.partition_B(sB));                               // (MMA,MMA_N,MMA_K,PIPE)
    CUTE_STATIC_ASSERT_V(size<1>(tCrA) == size<1>(accum));
    CUTE_STATIC_ASSERT_V(size<1>(tCrB) == size<2>(accum));
    constexpr int K_BLOCK_MAX = size<2>(tCrA);
    TiledMmaLR tiled_mma_lr;
    auto lr_fragments = lr_mma_fragments(tiled_mma_lr, warp_group_thread_layout(warp_group_idx), shared_tensors);
    auto const* scale_bits = reinterpret_cast<uint16_t const*>(&shared_tensors.smem_scale);

    auto wait = [&](PipelineState const& read, ConvertPipelineState const& conv_read) {
      pipeline.consumer_wait(read);
      conv.full[conv_read.index()].wait(conv_read.phase());
    };
    // one k-tile's wgmmas as one batch; each branch arrives and commits itself, so the batch's
    // last wgmma carries the commit (a commit after the branches' join costs a dummy wgmma)
    auto mma_tile = [&](int stage, int slot) {
      if constexpr (LowRankUp) {
        if (scale_bits[SmemLayoutScale{}(0, 0, stage)] == LrScaleSentinel) {
          warpgroup_arrive();
          CUTLASS_PRAGMA_UNROLL
          for (int k_block = 0; k_block < LrKBlocks; ++k_block) {
            tiled_mma_lr.accumulate_ = tiled_mma.accumulate_;
            cute::gemm(tiled_mma_lr, get<0>(lr_fragments)(_,_,k_block,stage), get<1>(lr_fragments)(_,_,k_block,stage), accum);
            tiled_mma.accumulate_ = GMMA::ScaleOut::One;
          }
          warpgroup_commit_batch();
          return;
        }
      }
      warpgroup_arrive();
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < K_BLOCK_MAX; ++k_block) {
        cute::gemm(tiled_mma, tCrA(_,_,k_block,slot), tCrB(_,_,k_block,stage), accum);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
    };

    ConvertPipelineState conv_read = convert_read_state(smem_pipe_read.count());
    PipelineState smem_pipe_release = smem_pipe_read;
    ConvertPipelineState conv_release = conv_read;

    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    warpgroup_fence_operand(accum);
    {  // first k-tile
      wait(smem_pipe_read, conv_read);
      mma_tile(smem_pipe_read.index(), conv_read.index());
      ++smem_pipe_read;
      ++conv_read;
    }
    warpgroup_fence_operand(accum);
    --k_tile_count;
    CUTLASS_PRAGMA_NO_UNROLL
    for ( ; k_tile_count > 0; --k_tile_count) {
      wait(smem_pipe_read, conv_read);
      warpgroup_fence_operand(accum);
      mma_tile(smem_pipe_read.index(), conv_read.index());
      warpgroup_wait<1>();  // the previous k-tile's wgmmas are done: release its stage and slot
      warpgroup_fence_operand(accum);
      pipeline.consumer_release(smem_pipe_release);
      conv.empty[conv_release.index()].arrive();
      ++smem_pipe_read;
      ++conv_read;
      ++smem_pipe_release;
      ++conv_release;
    }
    warpgroup_fence_operand(accum);
  }

  /// mma_tail for the producer conversion: wait for the last k-tile's wgmmas, release its stage and slot.
  CUTLASS_DEVICE void
  mma_tail_converted(MainloopPipeline pipeline, PipelineState smem_pipe_release, int k_tile_count, ConvertStorage& conv) {
    smem_pipe_release.advance(k_tile_count - 1);
    warpgroup_wait<0>();
    pipeline.consumer_release(smem_pipe_release);
    conv.empty[convert_read_state(smem_pipe_release.count()).index()].arrive();
  }

  /// Perform a Consumer Epilogue to release all buffers
  CUTLASS_DEVICE void
  mma_tail(MainloopPipeline pipeline, PipelineState smem_pipe_release, int k_tile_count) {
    // Prologue GMMAs
    int prologue_mma_count = 1;
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

// svdq: the stock utilities with the scale view and the per-k-block scale copy, and the
// lookup-table conversion (Collective::ScaleLut).
template <class Collective>
struct SvdqGroup64Utils : detail::MixedInputUtils<Collective> {
  using Base = detail::MixedInputUtils<Collective>;
  using ElementScale = typename Collective::ElementScale;
  using SmemLayoutScaleMma = typename Collective::SmemLayoutScaleMma;
  static constexpr bool UseLut = Collective::ScaleLut;
  // bytes 0-7: e4m3(fp16(c * s)) for c = -8..-1; bytes 8-15: for c = 0..7
  using Lut = cutlass::Array<uint32_t, 4>;

  template <class ThreadMma, class TensorStorage>
  CUTLASS_DEVICE static auto partition_extra_mma_info(ThreadMma const& mma_thread_slice, TensorStorage& shared_tensors) {
    Tensor sS = make_tensor(make_smem_ptr(shared_tensors.smem_scale.begin()), SmemLayoutScaleMma{});  // (BLK_M,BLK_K,PIPE)
    Tensor tCsS = mma_thread_slice.partition_A(sS);
    Tensor tCrS = make_tensor<ElementScale>(mma_thread_slice.partition_fragment_A(sS(_,_,Int<0>{})).layout());
    if constexpr (UseLut) {
      // one table per scale register: the same (broadcast) layout as the scales
      Tensor tCrT = make_tensor<Lut>(tCrS.layout());
      return cute::make_tuple(tCsS, tCrS, tCrT);
    }
    else {
      return cute::make_tuple(tCsS, tCrS);
    }
  }

  template <class SmemTiledCopyA, class TensorASmemView, class TensorACopyView, class... Ts, class... Us>
  CUTLASS_DEVICE static void copy_tensors_MK(
      SmemTiledCopyA const& smem_tiled_copy_A,
      TensorASmemView const& tCsA,
      TensorACopyView& tCrA_copy_view,
      cute::tuple<Ts...> const& partitioned_mma_extra_info,
      cute::tuple<Us...> const& tiled_copy_and_views,
      int k_block,
      int read_stage) {
    copy(smem_tiled_copy_A, tCsA(_,_,k_block,read_stage), tCrA_copy_view(_,_,k_block));
    // Every k-block has its own scale registers (two k-blocks per group), so copy them all;
    // the table conversion builds its tables from the first k-block of each group only.
    if (UseLut && (k_block % 2) != 0) {
      return;
    }
    auto smem_tiled_copy_S = cute::get<0>(tiled_copy_and_views);
    auto tCrS_copy_view    = cute::get<1>(tiled_copy_and_views);
    auto tCsS              = cute::get<0>(partitioned_mma_extra_info);
    copy(smem_tiled_copy_S, tCsS(_,_,k_block,read_stage), tCrS_copy_view(_,_,k_block));
  }

  // The 16 e4m3 bytes of a group's scale: fp16 products rounded to e4m3 (nearest-even, saturating)
  // by the converter the stock conversion uses; e4m3(fp16(c * s)) is odd in c, so the table for
  // c = 1..7 is the one for -1..-7 with the sign bits flipped.
  CUTLASS_DEVICE static Lut make_lut(cutlass::half_t s) {
    using Half8 = cutlass::Array<cutlass::half_t, 8>;
    Half8 codes;
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < 8; ++c) {
      codes[c] = cutlass::half_t(static_cast<float>(c - 8));
    }
    Half8 scale;
    scale.fill(s);
    Half8 prod = cutlass::multiplies<Half8>{}(codes, scale);
    cutlass::Array<cutlass::float_e4m3_t, 8> neg8 =
        cutlass::NumericArrayConverter<cutlass::float_e4m3_t, cutlass::half_t, 8, cutlass::FloatRoundStyle::round_to_nearest>::convert(prod);
    auto const& neg = reinterpret_cast<cutlass::Array<uint32_t, 2> const&>(neg8);
    Lut t;
    t[0] = neg[0];                                           // c = -8 -7 -6 -5
    t[1] = neg[1];                                           // c = -4 -3 -2 -1
    t[2] = prmt(neg[1], 0u, 0x1234u) ^ 0x80808000u;    // c =  0  1  2  3  (0 and -(-1..-3))
    t[3] = prmt(neg[0], neg[1], 0x1234u) ^ 0x80808080u;  // c = 4 5 6 7  (-(-4..-7))
    return t;
  }

  // PTX prmt (default mode): byte j of the result is byte sel[4j+3 : 4j] of {b, a}; only the
  // low 16 bits of sel are read, and a set bit 3 would replicate a sign, so selectors stay <= 7.
  CUTLASS_DEVICE static uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
    uint32_t d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
  }

  // Four int4 codes (the low 16 bits of idx / sel) to four e4m3 bytes.
  CUTLASS_DEVICE static uint32_t lut4(uint32_t idx, uint32_t sel, Lut const& t) {
    uint32_t const neg = prmt(t[0], t[1], idx);
    uint32_t const pos = prmt(t[2], t[3], idx);
    return prmt(pos, neg, sel);
  }

  template <class Layout>
  static constexpr bool quads_share_a_table(Layout const& layout) {
    for (int i = 0; i < size<1>(Layout{}); ++i) {
      for (int j = 0; j < 8; ++j) {
        if (layout(j, i) != layout(j & 4, i)) {
          return false;
        }
      }
    }
    return true;
  }

  template <class EngineIn, class EngineOut, class LayoutIn, class LayoutOut, class... Ts>
  CUTLASS_DEVICE static void dequantize_A_kblock(
      Tensor<EngineIn, LayoutIn> const& tCrA_load,
      Tensor<EngineOut, LayoutOut>& tCrA_mma,
      cute::tuple<Ts...>& partitioned_extra_info,
      int const k_block) {
    if constexpr (!UseLut) {
      Base::dequantize_A_kblock(tCrA_load, tCrA_mma, partitioned_extra_info, k_block);
    }
    else {
      static_assert(cute::is_same_v<typename EngineIn::value_type, cutlass::int4b_t>, "svdq: the table conversion reads int4");
      static_assert(cute::is_same_v<typename EngineOut::value_type, cutlass::float_e4m3_t>, "svdq: the table conversion writes e4m3");
      static_assert(cute::is_same_v<ElementScale, cutlass::half_t>, "svdq: the table conversion takes fp16 scales");
      Tensor src = tCrA_load(_, _, k_block);
      Tensor dst = tCrA_mma(_, _, k_block);
      CUTE_STATIC_ASSERT_V(size(src(_, 0)) == cosize(src(_, 0).layout()), "svdq: A's first mode must be contiguous");
      static_assert(decltype(size(src(_, 0)))::value % 8 == 0, "svdq: eight int4 codes per register");
      Tensor src_vm = cute::group_modes<1,-1>(cute::zipped_divide(src, Int<8>{}));
      Tensor dst_vm = cute::group_modes<1,-1>(cute::zipped_divide(dst, Int<8>{}));

      auto& tables = cute::get<2>(partitioned_extra_info);
      if (k_block % 2 == 0) {  // the first k-block of a 64-group: its rows' tables
        Tensor scales = cute::filter(cute::get<1>(partitioned_extra_info)(_, _, k_block));
        Tensor luts = cute::filter(tables(_, _, k_block));
        CUTE_STATIC_ASSERT_V(size(scales) == size(luts));
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(luts); ++i) {
          luts(i) = make_lut(scales(i));
        }
      }
      Tensor luts_vm = cute::group_modes<1,-1>(cute::zipped_divide(tables(_, _, k_block & ~1), Int<8>{}));
      static_assert(quads_share_a_table(decltype(luts_vm.layout()){}),
                    "svdq: each four consecutive codes of a register must share one scale");
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size<1>(dst_vm); ++i) {
        uint32_t const w = cute::recast<uint32_t>(src_vm(_, i))(0);
        uint32_t const idx = w & 0x77777777u;                          // the table index, 0..7
        uint32_t const sel = ((w & 0x88888888u) | 0x64206420u) >> 1;   // byte j from pos (j) or neg (j + 4)
        auto&& out = cute::recast<uint32_t>(dst_vm(_, i));
        out(0) = lut4(idx, sel, luts_vm(0, i));
        out(1) = lut4(idx >> 16, sel >> 16, luts_vm(4, i));
      }
    }
  }
};

} // namespace cutlass::gemm::collective

/////////////////////////////////////////////////////////////////////////////////////////////////
