//===- MoeOps.h - Operations of the moe dialect -----------------*- C++ -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_DIALECT_MOE_IR_MOEOPS_H
#define MOE_DIALECT_MOE_IR_MOEOPS_H

#include "moe/Dialect/Moe/IR/MoeDialect.h"

#include "mlir/Bytecode/BytecodeOpInterface.h"
#include "mlir/IR/BuiltinTypes.h"
#include "mlir/IR/OpDefinition.h"
#include "mlir/IR/RegionKindInterface.h"
#include "mlir/IR/SymbolTable.h"

#include "moe/Dialect/Moe/IR/MoeOpsEnums.h.inc"

#define GET_OP_CLASSES
#include "moe/Dialect/Moe/IR/MoeOps.h.inc"

#endif // MOE_DIALECT_MOE_IR_MOEOPS_H
