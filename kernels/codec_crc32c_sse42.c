/*
 * codec_crc32c_sse42.c - CRC-32C with the SSE4.2 crc32 instruction (8 bytes per step).
 * Compiled for the generic target; only this function is built for SSE4.2 and it is entered
 * only after CPUID says the instruction exists.
 */
#include "codec_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

bool kvt_crc32c_hw_available(void)
{
	return __builtin_cpu_supports("sse4.2");
}

__attribute__((target("sse4.2"))) uint32_t kvt_crc32c_hw(uint32_t crc, const void *buf,
							   size_t len)
{
	const uint8_t *p = buf;
	uint64_t c = ~crc;
	while (len && ((uintptr_t)p & 7)) {
		c = _mm_crc32_u8((uint32_t)c, *p++);
		len--;
	}
	while (len >= 8) {
		uint64_t w;
		memcpy(&w, p, 8);
		c = _mm_crc32_u64(c, w);
		p += 8;
		len -= 8;
	}
	while (len--)
		c = _mm_crc32_u8((uint32_t)c, *p++);
	return ~(uint32_t)c;
}
#else
bool kvt_crc32c_hw_available(void)
{
	return false;
}

uint32_t kvt_crc32c_hw(uint32_t crc, const void *buf, size_t len)
{
	return kvt_crc32c_sw(crc, buf, len);
}
#endif
