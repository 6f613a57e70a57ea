//===- recipe_fuzzer.cpp - libFuzzer: compression recipes ------------------===//
//
// Part of moec. Reads the input as a recipe: every pass is built from it
// with typed options, which must never crash or accept a value of the
// wrong type.
//
//===----------------------------------------------------------------------===//

#include "moe/Pipeline/Recipe.h"

#include <cstdio>
#include <string>
#include <unistd.h>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const std::string path = [] {
    char name[] = "/tmp/moec-fuzz-recipe-XXXXXX.json";
    const int fd = ::mkstemps(name, 5);
    if (fd >= 0)
      ::close(fd);
    return std::string(name);
  }();
  FILE *out = std::fopen(path.c_str(), "wb");
  if (!out)
    return 0;
  std::fwrite(data, 1, size, out);
  std::fclose(out);
  moe::Expected<moe::Recipe> recipe = moe::readRecipe(path);
  if (!recipe)
    return 0;
  for (const moe::RecipePass &pass : recipe->passes)
    (void)moe::buildRecipePass(*recipe, pass, moe::PassOverrides{"stats.safetensors", 0, {}});
  return 0;
}
