//===- Gptq.cpp - GPTQ quantization of one weight matrix ------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "Gptq.h"

#include <Eigen/Dense>
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

extern "C" {
// LAPACK (in OpenBLAS): Cholesky factorisation and triangular inverse.
void dpotrf_(const char *uplo, const int *n, double *a, const int *lda, int *info);
void dtrtri_(const char *uplo, const char *diag, const int *n, double *a, const int *lda, int *info);
}

namespace moe {

namespace {

using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A group's scale and min as the format stores them (rounded to 16 bits
/// so that the codes computed here are the codes the kernels decode).
struct GroupGrid {
  float scale = 0, min = 0;
};

GroupGrid gridOf(const quant::QuantFormat &format, const double *values, int64_t count, int64_t stride) {
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

} // namespace

Status quantizeGptq(const quant::QuantFormat &format, const std::vector<float> &weights, int64_t rows, int64_t cols,
                    std::vector<double> hessian, const GptqOptions &options, std::vector<uint8_t> &packed) {
  if (static_cast<int64_t>(weights.size()) != rows * cols || static_cast<int64_t>(hessian.size()) != cols * cols)
    return Status::error("GPTQ: a ", rows, "x", cols, " matrix needs a ", cols, "x", cols, " Hessian");
  if (options.block < 1 || !(options.damping >= 0) || !std::isfinite(options.damping))
    return Status::error("GPTQ: block must be positive and damping non-negative");
  Matrix W = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(weights.data(),
                                                                                                     rows, cols)
                 .cast<double>();
  Matrix H = Eigen::Map<Matrix>(hessian.data(), cols, cols);
  // Groups in the original column order (the layout's), fixed up front
  // with act-order, else when each group's first column comes up.
  const int64_t groups = format.groupsPerRow(cols);
  std::vector<std::vector<GroupGrid>> grids(static_cast<size_t>(rows),
                                            std::vector<GroupGrid>(static_cast<size_t>(groups)));
  std::vector<bool> gridReady(static_cast<size_t>(groups), false);
  auto computeGrids = [&](int64_t group) {
    const int64_t first = group * format.group, count = std::min<int64_t>(format.group, cols - first);
    for (int64_t r = 0; r < rows; ++r)
      grids[r][group] = gridOf(format, W.data() + r * cols + first, count, 1);
    gridReady[group] = true;
  };

  for (int64_t i = 0; i < cols; ++i)
    if (H(i, i) <= 0) {
      H.row(i).setZero();
      H.col(i).setZero();
      H(i, i) = 1;
    }
  const double damp = options.damping * H.diagonal().mean();
  H.diagonal().array() += damp;

  std::vector<int64_t> order(static_cast<size_t>(cols));
  std::iota(order.begin(), order.end(), 0);
  if (options.actOrder) {
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return H(a, a) > H(b, b); });
    for (int64_t g = 0; g < groups; ++g)
      computeGrids(g);
  }
  // Permute to quantization order.
  Matrix Wp(rows, cols), Hp(cols, cols);
  for (int64_t j = 0; j < cols; ++j)
    Wp.col(j) = W.col(order[j]);
  for (int64_t a = 0; a < cols; ++a)
    for (int64_t b = 0; b < cols; ++b)
      Hp(a, b) = H(order[a], order[b]);

  // U: the upper Cholesky factor of H^-1 (H^-1 = U^T U). With V = U^-1,
  // H = V V^T and V is upper triangular: the lower Cholesky factor of H
  // with rows and columns reversed, reversed back. One factorisation and
  // one triangular inverse (LAPACK through OpenBLAS, which picks its SIMD
  // code at run time) instead of an inverse and a second factorisation.
  Matrix U = Hp.reverse();
  const int n = static_cast<int>(cols);
  int info = 0;
  // Row-major buffers are LAPACK's column-major transposes: "U" on the
  // symmetric matrix leaves L (R = L L^T) in the row-major lower triangle.
  dpotrf_("U", &n, U.data(), &n, &info);
  if (info != 0)
    return Status::error("GPTQ: the damped Hessian is not positive definite (raise damping)");
  U.triangularView<Eigen::StrictlyUpper>().setZero();
  U = Matrix(U.reverse()); // V, upper triangular
  // V^-1 in place: the row-major upper triangle is LAPACK's lower one.
  dtrtri_("L", "N", &n, U.data(), &n, &info);
  if (info != 0)
    return Status::error("GPTQ: the inverse Hessian factor is singular (raise damping)");
  U.triangularView<Eigen::StrictlyLower>().setZero();

  Matrix Q(rows, cols);
  for (int64_t begin = 0; begin < cols; begin += options.block) {
    const int64_t end = std::min(cols, begin + options.block), count = end - begin;
    Matrix errors(rows, count);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t column = order[j], group = column / format.group;
      if (!gridReady[group]) {
        // The group's columns as updated so far (no act-order: in order).
        for (int64_t c = column; c < std::min(cols, (group + 1) * format.group); ++c)
          W.col(c) = Wp.col(c);
        computeGrids(group);
      }
      const double d = U(j, j);
      for (int64_t r = 0; r < rows; ++r) {
        const double w = Wp(r, j);
        const double q = roundToGrid(format, grids[r][group], w);
        Q(r, j) = q;
        errors(r, j - begin) = (w - q) / d;
      }
      // Spread the error over this block's remaining columns.
      if (j + 1 < end)
        Wp.block(0, j + 1, rows, end - j - 1).noalias() -= errors.col(j - begin) * U.block(j, j + 1, 1, end - j - 1);
    }
    if (end < cols) // the lazy batch update, the bulk of the work: one GEMM
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows), static_cast<int>(cols - end),
                  static_cast<int>(count), -1.0, errors.data(), static_cast<int>(count), U.data() + begin * cols + end,
                  static_cast<int>(cols), 1.0, Wp.data() + end, static_cast<int>(cols));
  }

  // Encode: the chosen values are on their group's grid; recover the codes.
  packed.assign(format.matrixBytes(rows, cols), 0);
  std::vector<int64_t> position(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j)
    position[order[j]] = j;
  std::vector<float> values(static_cast<size_t>(format.group));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = g * format.group, count = std::min<int64_t>(format.group, cols - first);
      uint8_t *target = packed.data() + r * format.rowBytes(cols) + g * format.groupBytes();
      const GroupGrid &grid = grids[r][g];
      const uint16_t scaleBits = quant::floatToScale(grid.scale, format.scaleType);
      std::memcpy(target, &scaleBits, 2);
      if (!format.symmetric) {
        const uint16_t minBits = quant::floatToScale(grid.min, format.scaleType);
        std::memcpy(target + 2, &minBits, 2);
      }
      for (int64_t i = 0; i < count; ++i)
        values[i] = static_cast<float>(Q(r, position[first + i]));
      quant::quantizeGroupWith(format, values.data(), count, grid.scale, grid.min, target + format.headerBytes());
    }
  return Status::success();
}

} // namespace moe
