//===- recipe_fuzzer.cpp - libFuzzer: compression recipes ------------------===//
//
// Part of moec. Reads the input as a recipe: every pass is built from it
// with typed options, which must never crash or accept a value of the
// wrong type.
//
//===----------------------------------------------------------------------===//

#include "moe/Pipeline/Recipe.h"

#include "ScratchFile.h"

#include <string>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const std::string path = writeScratchFile(".json", data, size);
  if (path.empty())
    return 0;
  moe::Expected<moe::Recipe> recipe = moe::readRecipe(path);
  if (!recipe)
    return 0;
  for (const moe::RecipePass &pass : recipe->passes)
    (void)moe::buildRecipePass(*recipe, pass, moe::PassOverrides{"stats.safetensors", 0, {}});
  return 0;
}
