//===- MoeDialect.h - The moe dialect ---------------------------*- C++ -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_DIALECT_MOE_IR_MOEDIALECT_H
#define MOE_DIALECT_MOE_IR_MOEDIALECT_H

#include "mlir/IR/Dialect.h"

#include "moe/Dialect/Moe/IR/MoeOpsDialect.h.inc"

#define GET_ATTRDEF_CLASSES
#include "moe/Dialect/Moe/IR/MoeOpsAttributes.h.inc"

#endif // MOE_DIALECT_MOE_IR_MOEDIALECT_H
