/*
 * codec_isa.c - picks the kernel table: AVX2+F16C when CPUID has both, scalar otherwise.
 * KVT_ISA=scalar|avx2 in the environment (read once, at first use) or kvt_codec_set_isa()
 * force one; the choice is one atomic word read once per API call.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "codec_internal.h"

static _Atomic int isa_choice = -1; /* -1: not decided yet; else enum kvt_isa (never AUTO) */

static bool cpu_has_avx2(void)
{
#ifdef KVT_HAVE_AVX2_BUILD
	__builtin_cpu_init();
	return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
	return false;
#endif
}

static int resolve_auto(void)
{
	return cpu_has_avx2() ? KVT_ISA_AVX2 : KVT_ISA_SCALAR;
}

static int decide(void)
{
	int c = atomic_load_explicit(&isa_choice, memory_order_acquire);
	if (c >= 0)
		return c;
	int want = resolve_auto();
	const char *env = getenv("KVT_ISA");
	if (env && strcmp(env, "scalar") == 0)
		want = KVT_ISA_SCALAR;
	else if (env && strcmp(env, "avx2") == 0 && cpu_has_avx2())
		want = KVT_ISA_AVX2;
	int expected = -1;
	if (!atomic_compare_exchange_strong(&isa_choice, &expected, want))
		return expected; /* a set_isa or another thread decided first */
	return want;
}

int kvt_codec_set_isa(enum kvt_isa isa)
{
	int want;
	switch (isa) {
	case KVT_ISA_AUTO:
		want = resolve_auto();
		break;
	case KVT_ISA_SCALAR:
		want = KVT_ISA_SCALAR;
		break;
	case KVT_ISA_AVX2:
		if (!cpu_has_avx2())
			return -ENOTSUP;
		want = KVT_ISA_AVX2;
		break;
	default:
		return -EINVAL;
	}
	atomic_store_explicit(&isa_choice, want, memory_order_release);
	return 0;
}

enum kvt_isa kvt_codec_active_isa(void)
{
	return (enum kvt_isa)decide();
}

const struct kvt_codec_ops *kvt_codec_ops_get(void)
{
#ifdef KVT_HAVE_AVX2_BUILD
	if (decide() == KVT_ISA_AVX2)
		return &kvt_codec_ops_avx2;
#endif
	return &kvt_codec_ops_scalar;
}
