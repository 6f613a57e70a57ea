//===- Gptq.cpp - GPTQ quantization of one weight matrix ------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "Gptq.h"
#include "moe/Support/HugePages.h"

#include <Eigen/Dense>
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>

extern "C" {
// LAPACK (in OpenBLAS): Cholesky factorisation and triangular inverse.
void dpotrf_(const char *uplo, const int *n, double *a, const int *lda, int *info);
void dtrtri_(const char *uplo, const char *diag, const int *n, double *a, const int *lda, int *info);
void spotrf_(const char *uplo, const int *n, float *a, const int *lda, int *info);
void strtri_(const char *uplo, const char *diag, const int *n, float *a, const int *lda, int *info);
}

namespace moe {

namespace {

template <typename Scalar> using MatrixOf = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A fresh [rows, cols] matrix, advised for huge pages before it is
/// written (moe/Support/HugePages.h: GPTQ of a DeepSeek-V3 layer makes
/// tens of GB of them).
template <typename Scalar> MatrixOf<Scalar> freshMatrix(int64_t rows, int64_t cols) {
  MatrixOf<Scalar> m(rows, cols);
  adviseHugePages(m.data(), static_cast<size_t>(m.size()) * sizeof(Scalar));
  return m;
}

using Matrix = MatrixOf<double>;

// LAPACK and BLAS by element type.
void potrf(const char *uplo, const int *n, double *a, int *info) { dpotrf_(uplo, n, a, n, info); }
void potrf(const char *uplo, const int *n, float *a, int *info) { spotrf_(uplo, n, a, n, info); }
void trtri(const char *uplo, const int *n, double *a, int *info) { dtrtri_(uplo, "N", n, a, n, info); }
void trtri(const char *uplo, const int *n, float *a, int *info) { strtri_(uplo, "N", n, a, n, info); }
/// C -= A B (row-major; A [m, k], B [k, n] of leading dimension ldb, C of ldc).
void subtractProduct(int m, int n, int k, const double *a, const double *b, int ldb, double *c, int ldc) {
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, -1.0, a, k, b, ldb, 1.0, c, ldc);
}
void subtractProduct(int m, int n, int k, const float *a, const float *b, int ldb, float *c, int ldc) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, -1.0f, a, k, b, ldb, 1.0f, c, ldc);
}

/// A group's scale and min as the format stores them (rounded to 16 bits
/// so that the codes computed here are the codes the kernels decode).
struct GroupGrid {
  float scale = 0, min = 0;
};

template <typename Scalar>
GroupGrid gridOf(const quant::QuantFormat &format, const Scalar *values, int64_t count, int64_t stride) {
  std::vector<float> column(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i)
    column[i] = static_cast<float>(values[i * stride]);
  // The reference quantizer computes (and rounds) the header; reuse it on
  // this one group.
  std::vector<uint8_t> bytes(format.groupBytes());
  quant::QuantFormat one = format;
  quant::quantizeReference(one, column.data(), 1, count, bytes.data());
  GroupGrid grid;
  uint16_t bits;
  std::memcpy(&bits, bytes.data(), 2);
  grid.scale = quant::scaleToFloat(bits, format.scaleType);
  if (format.symmetric) {
    grid.min = -static_cast<float>(format.zeroPoint()) * grid.scale;
  } else {
    std::memcpy(&bits, bytes.data() + 2, 2);
    grid.min = quant::scaleToFloat(bits, format.scaleType);
  }
  return grid;
}

double roundToGrid(const quant::QuantFormat &format, const GroupGrid &grid, double value) {
  if (grid.scale == 0.0f)
    return grid.min;
  const double code =
      std::clamp(std::nearbyint((value - grid.min) / grid.scale), 0.0, static_cast<double>(format.maxCode()));
  return code * grid.scale + grid.min;
}

/// A grid GPTQ rounds to: chosen per group of columns (on the weights that
/// GptqGroupScales names, or up front with act-order), then one value at a
/// time.
template <typename Scalar> struct Grid {
  int64_t groupSize;
  /// Chooses the grids of every row for `group` from `W` (original column
  /// order) and the damped Hessian's diagonal `importance`.
  std::function<void(int64_t group, const MatrixOf<Scalar> &W, const std::vector<double> &importance)> choose;
  /// The grid value nearest `value` at (row, column).
  std::function<double(int64_t row, int64_t column, double value)> round;
};

} // namespace

/// What GPTQ derives from a Hessian alone: the damped diagonal (column
/// importance), the quantization order, and U, the upper Cholesky factor
/// of the damped inverse Hessian in that order, in the options' precision
/// (the other matrix stays empty).
struct GptqFactor {
  int64_t cols = 0;
  GptqPrecision precision = GptqPrecision::F64;
  bool inDoubleInstead = false; ///< Asked for float; float's factorisation failed.
  std::vector<double> importance;
  std::vector<int64_t> order;
  MatrixOf<double> U;
  MatrixOf<float> singleU;
  template <typename Scalar> const MatrixOf<Scalar> &u() const {
    if constexpr (std::is_same_v<Scalar, double>)
      return U;
    else
      return singleU;
  }
};

namespace {

/// U from the damped Hessian `H` and the quantization order: built
/// straight in `Scalar` from H (so a float factor never holds a double
/// copy of the permuted Hessian beside H: 12 bytes a Hessian element at
/// the peak instead of 32, which is what lets DeepSeek-V3's o_proj with
/// 16,384 columns factor in about 3 GB).
template <typename Scalar>
Status factorInPrecision(MatrixOf<Scalar> &U, const Eigen::Map<Matrix> &H, const std::vector<int64_t> &order) {
  const int64_t cols = H.rows();
  // U: the upper Cholesky factor of H^-1 (H^-1 = U^T U), in the
  // quantization order. With V = U^-1, H = V V^T and V is upper
  // triangular: the lower Cholesky factor of H with rows and columns
  // reversed, reversed back. One factorisation and one triangular inverse
  // (LAPACK through OpenBLAS, which picks its SIMD code at run time)
  // instead of an inverse and a second factorisation.
  U = freshMatrix<Scalar>(cols, cols);
  for (int64_t a = 0; a < cols; ++a) {
    const int64_t row = order[cols - 1 - a];
    for (int64_t b = 0; b < cols; ++b)
      U(a, b) = static_cast<Scalar>(H(row, order[cols - 1 - b]));
  }
  const int n = static_cast<int>(cols);
  int info = 0;
  // Row-major buffers are LAPACK's column-major transposes: "U" on the
  // symmetric matrix leaves L (R = L L^T) in the row-major lower triangle.
  potrf("U", &n, U.data(), &info);
  if (info != 0)
    return Status::error("GPTQ: the damped Hessian is not positive definite (raise damping)");
  U.template triangularView<Eigen::StrictlyUpper>().setZero();
  U.reverseInPlace(); // V, upper triangular
  // V^-1 in place: the row-major upper triangle is LAPACK's lower one.
  trtri("L", &n, U.data(), &info);
  if (info != 0)
    return Status::error("GPTQ: the inverse Hessian factor is singular (raise damping)");
  U.template triangularView<Eigen::StrictlyLower>().setZero();
  return Status::success();
}

} // namespace

bool factoredInDoubleInstead(const GptqFactor &factor) { return factor.inDoubleInstead; }

Expected<std::shared_ptr<const GptqFactor>> factorGptqHessian(std::vector<double> hessian, int64_t cols,
                                                              const GptqOptions &options) {
  if (cols <= 0 || static_cast<int64_t>(hessian.size()) != cols * cols)
    return Status::error("GPTQ: a Hessian of ", hessian.size(), " values for ", cols, " columns");
  if (options.block < 1 || !(options.damping >= 0) || !std::isfinite(options.damping))
    return Status::error("GPTQ: block must be positive and damping non-negative");
  Eigen::Map<Matrix> H(hessian.data(), cols, cols);
  auto factor = std::make_shared<GptqFactor>();
  factor->cols = cols;
  for (int64_t i = 0; i < cols; ++i)
    if (H(i, i) <= 0) {
      H.row(i).setZero();
      H.col(i).setZero();
      H(i, i) = 1;
    }
  const double damp = options.damping * H.diagonal().mean();
  H.diagonal().array() += damp;
  factor->importance.resize(static_cast<size_t>(cols));
  for (int64_t i = 0; i < cols; ++i)
    factor->importance[i] = H(i, i);
  std::vector<int64_t> &order = factor->order;
  order.resize(static_cast<size_t>(cols));
  std::iota(order.begin(), order.end(), 0);
  if (options.actOrder)
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return H(a, a) > H(b, b); });
  factor->precision = options.precision;
  if (options.precision == GptqPrecision::F32) {
    if (factorInPrecision(factor->singleU, H, order).ok())
      return std::shared_ptr<const GptqFactor>(std::move(factor));
    // Positive definite only to double's precision: this one in double.
    factor->singleU.resize(0, 0);
    factor->precision = GptqPrecision::F64;
    factor->inDoubleInstead = true;
  }
  MOE_RETURN_IF_ERROR(factorInPrecision(factor->U, H, order));
  return std::shared_ptr<const GptqFactor>(std::move(factor));
}

namespace {

/// GPTQ proper: Q (original column order) from W and the Hessian's factor.
template <typename Scalar>
Status runGptq(MatrixOf<Scalar> W, const GptqFactor &factor, const GptqOptions &options, const Grid<Scalar> &grid,
               MatrixOf<Scalar> &Q) {
  const int64_t rows = W.rows(), cols = W.cols();
  if (cols != factor.cols)
    return Status::error("GPTQ: a Hessian factor of ", factor.cols, " columns for a matrix of ", cols);
  const int64_t groups = (cols + grid.groupSize - 1) / grid.groupSize;
  std::vector<bool> gridReady(static_cast<size_t>(groups), false);
  const std::vector<double> &importance = factor.importance;
  const std::vector<int64_t> &order = factor.order;
  const MatrixOf<Scalar> &U = factor.u<Scalar>();
  auto computeGrids = [&](int64_t group) {
    grid.choose(group, W, importance);
    gridReady[group] = true;
  };
  if (options.actOrder || options.groupScales == GptqGroupScales::Static)
    for (int64_t g = 0; g < groups; ++g)
      computeGrids(g);
  // Permute to quantization order, a row at a time: copied a column at a
  // time, every element of a row-major matrix is a cache miss (this copy
  // was a third of GPTQ's own time at DeepSeek-V3's shapes, order or not).
  MatrixOf<Scalar> Wp = freshMatrix<Scalar>(rows, cols);
  for (int64_t r = 0; r < rows; ++r) {
    const Scalar *from = W.data() + r * cols;
    Scalar *to = Wp.data() + r * cols;
    for (int64_t j = 0; j < cols; ++j)
      to[j] = from[order[j]];
  }

  Q = freshMatrix<Scalar>(rows, cols);
  MatrixOf<Scalar> blockStart;
  for (int64_t begin = 0; begin < cols; begin += options.block) {
    const int64_t end = std::min(cols, begin + options.block), count = end - begin;
    if (options.groupScales == GptqGroupScales::Block && !options.actOrder)
      blockStart = Wp.middleCols(begin, count);
    MatrixOf<Scalar> errors(rows, count);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t column = order[j], group = column / grid.groupSize;
      if (!gridReady[group]) {
        // The group's columns (no act-order: in order) as updated so far,
        // or as of this block's start; columns past the block have had no
        // update since.
        for (int64_t c = column; c < std::min(cols, (group + 1) * grid.groupSize); ++c)
          W.col(c) = options.groupScales == GptqGroupScales::Block && c < end ? blockStart.col(c - begin) : Wp.col(c);
        computeGrids(group);
      }
      const Scalar d = U(j, j);
      for (int64_t r = 0; r < rows; ++r) {
        const Scalar w = Wp(r, j);
        const Scalar q = static_cast<Scalar>(grid.round(r, column, w));
        Q(r, column) = q;
        errors(r, j - begin) = (w - q) / d;
      }
      // Spread the error over this block's remaining columns.
      if (j + 1 < end)
        Wp.block(0, j + 1, rows, end - j - 1).noalias() -= errors.col(j - begin) * U.block(j, j + 1, 1, end - j - 1);
    }
    if (end < cols) // the lazy batch update, the bulk of the work: one GEMM
      subtractProduct(static_cast<int>(rows), static_cast<int>(cols - end), static_cast<int>(count), errors.data(),
                      U.data() + begin * cols + end, static_cast<int>(cols), Wp.data() + end, static_cast<int>(cols));
  }
  return Status::success();
}

Status checkInputs(const std::vector<float> &weights, int64_t rows, int64_t cols, const GptqFactor &factor,
                   const GptqOptions &options) {
  if (static_cast<int64_t>(weights.size()) != rows * cols || factor.cols != cols)
    return Status::error("GPTQ: a ", rows, "x", cols, " matrix needs a ", cols, "x", cols, " Hessian");
  if (options.block < 1 || !(options.damping >= 0) || !std::isfinite(options.damping))
    return Status::error("GPTQ: block must be positive and damping non-negative");
  return Status::success();
}

template <typename Scalar> MatrixOf<Scalar> toMatrix(const std::vector<float> &weights, int64_t rows, int64_t cols) {
  MatrixOf<Scalar> m = freshMatrix<Scalar>(rows, cols);
  m = Eigen::Map<const MatrixOf<float>>(weights.data(), rows, cols).template cast<Scalar>();
  return m;
}

/// Calls `run` with a double or float tag: the factor's precision.
template <typename Run> Status inPrecision(const GptqFactor &factor, Run run) {
  if (factor.precision == GptqPrecision::F32)
    return run(float{});
  return run(double{});
}

} // namespace

namespace {

/// The factor of a matrix's own Hessian, then `quantize` with it.
template <typename Quantize>
Status withOwnFactor(int64_t rows, int64_t cols, std::vector<double> hessian, const GptqOptions &options,
                     Quantize quantize) {
  if (static_cast<int64_t>(hessian.size()) != cols * cols)
    return Status::error("GPTQ: a ", rows, "x", cols, " matrix needs a ", cols, "x", cols, " Hessian");
  Expected<std::shared_ptr<const GptqFactor>> factor = factorGptqHessian(std::move(hessian), cols, options);
  if (!factor)
    return factor.status();
  return quantize(**factor);
}

} // namespace

Status quantizeGptq(const quant::QuantFormat &format, const std::vector<float> &weights, int64_t rows, int64_t cols,
                    std::vector<double> hessian, const GptqOptions &options, std::vector<uint8_t> &packed) {
  return withOwnFactor(rows, cols, std::move(hessian), options, [&](const GptqFactor &factor) {
    return quantizeGptq(format, weights, rows, cols, factor, options, packed);
  });
}

Status quantizeGptq(const quant::QuantFormat &format, const std::vector<float> &weights, int64_t rows, int64_t cols,
                    const GptqFactor &factor, const GptqOptions &options, std::vector<uint8_t> &packed) {
  MOE_RETURN_IF_ERROR(checkInputs(weights, rows, cols, factor, options));
  const int64_t groups = format.groupsPerRow(cols);
  std::vector<std::vector<GroupGrid>> grids(static_cast<size_t>(rows),
                                            std::vector<GroupGrid>(static_cast<size_t>(groups)));
  return inPrecision(factor, [&]<typename Scalar>(Scalar) -> Status {
    Grid<Scalar> grid;
    grid.groupSize = format.group;
    grid.choose = [&](int64_t group, const MatrixOf<Scalar> &W, const std::vector<double> &) {
      const int64_t first = group * format.group, count = std::min<int64_t>(format.group, cols - first);
      for (int64_t r = 0; r < rows; ++r)
        grids[r][group] = gridOf(format, W.data() + r * cols + first, count, 1);
    };
    grid.round = [&](int64_t r, int64_t column, double value) {
      return roundToGrid(format, grids[r][column / format.group], value);
    };
    MatrixOf<Scalar> Q;
    MOE_RETURN_IF_ERROR(runGptq(toMatrix<Scalar>(weights, rows, cols), factor, options, grid, Q));

    // Encode: the chosen values are on their group's grid; recover the codes.
    packed.assign(format.matrixBytes(rows, cols), 0);
    std::vector<float> values(static_cast<size_t>(format.group));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t first = g * format.group, count = std::min<int64_t>(format.group, cols - first);
        uint8_t *target = packed.data() + r * format.rowBytes(cols) + g * format.groupBytes();
        const GroupGrid &cell = grids[r][g];
        const uint16_t scaleBits = quant::floatToScale(cell.scale, format.scaleType);
        std::memcpy(target, &scaleBits, 2);
        if (!format.symmetric) {
          const uint16_t minBits = quant::floatToScale(cell.min, format.scaleType);
          std::memcpy(target + 2, &minBits, 2);
        }
        for (int64_t i = 0; i < count; ++i)
          values[i] = static_cast<float>(Q(r, first + i));
        quant::quantizeGroupWith(format, values.data(), count, cell.scale, cell.min, target + format.headerBytes());
      }
    return Status::success();
  });
}

Status quantizeGptqGgml(quant::GgmlType type, const std::vector<float> &weights, int64_t rows, int64_t cols,
                        std::vector<double> hessian, const GptqOptions &options, std::vector<uint8_t> &packed) {
  return withOwnFactor(rows, cols, std::move(hessian), options, [&](const GptqFactor &factor) {
    return quantizeGptqGgml(type, weights, rows, cols, factor, options, packed);
  });
}

Status quantizeGptqGgml(quant::GgmlType type, const std::vector<float> &weights, int64_t rows, int64_t cols,
                        const GptqFactor &factor, const GptqOptions &options, std::vector<uint8_t> &packed) {
  MOE_RETURN_IF_ERROR(checkInputs(weights, rows, cols, factor, options));
  const quant::GgmlTraits *traits = quant::ggmlTraits(type);
  if (!traits || !quant::isGgmlBlockFormat(type) || cols % traits->blockSize != 0)
    return Status::error("GPTQ: rows of ", cols, " values are not whole blocks of the ggml format");
  const size_t rowBytes = quant::ggmlRowBytes(type, cols);
  packed.assign(rowBytes * static_cast<size_t>(rows), 0);
  // The grid is the format's own: a block's scales (K-quants: the
  // super-block's quantized sub-block scales) chosen from the weights that
  // GptqGroupScales names, weighted by the Hessian's diagonal; each value
  // then rounded under them, its code written in place.
  std::vector<float> values(static_cast<size_t>(traits->blockSize)), importance(values.size());
  return inPrecision(factor, [&]<typename Scalar>(Scalar) -> Status {
    Grid<Scalar> grid;
    grid.groupSize = traits->blockSize;
    grid.choose = [&](int64_t block, const MatrixOf<Scalar> &W, const std::vector<double> &diagonal) {
      const int64_t first = block * traits->blockSize;
      for (int64_t i = 0; i < traits->blockSize; ++i)
        importance[i] = static_cast<float>(diagonal[first + i]);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < traits->blockSize; ++i)
          values[i] = static_cast<float>(W(r, first + i));
        quant::ggmlChooseScales(type, values.data(), importance.data(),
                                packed.data() + r * rowBytes + block * traits->blockBytes);
      }
    };
    grid.round = [&](int64_t r, int64_t column, double value) {
      const int64_t block = column / traits->blockSize;
      return static_cast<double>(
          quant::ggmlQuantizeValue(type, packed.data() + r * rowBytes + block * traits->blockBytes,
                                   static_cast<int>(column % traits->blockSize), static_cast<float>(value)));
    };
    MatrixOf<Scalar> Q;
    return runGptq(toMatrix<Scalar>(weights, rows, cols), factor, options, grid, Q);
  });
}

} // namespace moe
