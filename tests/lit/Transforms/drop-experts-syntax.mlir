// RUN: not moe-opt %s --moe-drop-experts="experts=zero:1" 2>&1 | FileCheck %s
// CHECK: error: moe-drop-experts: expected 'layer:id,id;...', got 'zero:1'
moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
}
