/*
 * codec_kernels.c - the portable scalar kernels: the reference every other path must match
 * bit for bit (see the operation order documented in codec_internal.h).
 */
#include "codec_internal.h"

static void s_load_f32(const void *src, uint32_t dtype, float *dst, size_t n)
{
	const uint16_t *h = src;
	switch (dtype) {
	case KVT_DTYPE_F16:
		for (size_t i = 0; i < n; i++)
			dst[i] = kvt_f16_to_f32_inline(h[i]);
		break;
	case KVT_DTYPE_BF16:
		for (size_t i = 0; i < n; i++)
			dst[i] = kvt_bf16_to_f32_inline(h[i]);
		break;
	default:
		memmove(dst, src, n * 4);
		break;
	}
}

static void s_store_f32(const float *src, void *dst, uint32_t dtype, size_t n)
{
	uint16_t *h = dst;
	switch (dtype) {
	case KVT_DTYPE_F16:
		for (size_t i = 0; i < n; i++)
			h[i] = kvt_f32_to_f16_inline(src[i]);
		break;
	case KVT_DTYPE_BF16:
		for (size_t i = 0; i < n; i++)
			h[i] = kvt_f32_to_bf16_inline(src[i]);
		break;
	default:
		memmove(dst, src, n * 4);
		break;
	}
}

static void s_fwht(float *x, size_t n, uint32_t d, float mult)
{
	for (size_t v = 0; v < n; v++, x += d) {
		for (uint32_t h = 1; h < d; h <<= 1)
			for (uint32_t i = 0; i < d; i += 2 * h)
				for (uint32_t j = i; j < i + h; j++) {
					float a = x[j], b = x[j + h];
					x[j] = a + b;
					x[j + h] = a - b;
				}
		for (uint32_t j = 0; j < d; j++)
			x[j] = x[j] * mult;
	}
}

static float s_sumsq(const float *x, size_t n)
{
	float acc[8] = {0};
	for (size_t i = 0; i < n; i += 8)
		for (int l = 0; l < 8; l++)
			acc[l] = acc[l] + x[i + l] * x[i + l];
	return kvt_reduce8(acc);
}

static float s_dot(const float *a, const float *b, size_t n)
{
	float acc[8] = {0};
	for (size_t i = 0; i < n; i += 8)
		for (int l = 0; l < 8; l++)
			acc[l] = acc[l] + a[i + l] * b[i + l];
	return kvt_reduce8(acc);
}

static void s_div(float *x, size_t n, float div)
{
	for (size_t i = 0; i < n; i++)
		x[i] = x[i] / div;
}

static void s_axpy(float *y, const float *x, float a, size_t n)
{
	for (size_t i = 0; i < n; i++)
		y[i] = y[i] + a * x[i];
}

static void s_quant_cols(const float *x, size_t x_stride, uint32_t ntok, const uint8_t *pin,
			 uint32_t d, uint32_t bits, uint32_t sdt, uint16_t *scale, uint16_t *zero,
			 uint8_t *codes8)
{
	float qmax = (float)((1u << bits) - 1);
	bool any = false;
	for (uint32_t t = 0; t < ntok; t++)
		any |= !pin[t];
	for (uint32_t c = 0; c < d; c++) {
		float mn = __builtin_inff(), mx = -__builtin_inff();
		for (uint32_t t = 0; t < ntok; t++) {
			if (pin[t])
				continue;
			float v = x[t * x_stride + c];
			mn = v < mn ? v : mn;
			mx = v > mx ? v : mx;
		}
		float s, z;
		kvt_qparam(mn, mx, any, qmax, sdt, &scale[c], &zero[c], &s, &z);
		for (uint32_t t = 0; t < ntok; t++)
			codes8[t * d + c] =
				pin[t] ? 0 : (uint8_t)kvt_qcode(x[t * x_stride + c], s, z, qmax);
	}
}

static void s_quant_rows(const float *x, size_t x_stride, uint32_t nrows, const uint8_t *pin,
			 uint32_t d, uint32_t gv, uint32_t bits, uint32_t sdt, uint16_t *scale,
			 uint16_t *zero, uint8_t *codes8)
{
	float qmax = (float)((1u << bits) - 1);
	uint32_t ng = d / gv;
	for (uint32_t r = 0; r < nrows; r++) {
		const float *xr = x + r * x_stride;
		uint16_t *sr = scale + (size_t)r * ng, *zr = zero + (size_t)r * ng;
		uint8_t *cr = codes8 + (size_t)r * d;
		if (pin && pin[r]) {
			memset(sr, 0, ng * 2);
			memset(zr, 0, ng * 2);
			memset(cr, 0, d);
			continue;
		}
		for (uint32_t g = 0; g < ng; g++) {
			const float *xg = xr + g * gv;
			float mn, mx, s, z;
			kvt_minmax8(xg, gv, &mn, &mx);
			kvt_qparam(mn, mx, true, qmax, sdt, &sr[g], &zr[g], &s, &z);
			for (uint32_t c = 0; c < gv; c++)
				cr[g * gv + c] = (uint8_t)kvt_qcode(xg[c], s, z, qmax);
		}
	}
}

static void s_mse_cols(const float *x, size_t x_stride, uint32_t ntok, const uint8_t *pin,
		       uint32_t d, uint32_t bits, uint32_t sdt, uint16_t *scale, uint16_t *zero,
		       uint8_t *codes8)
{
	float qmax = (float)((1u << bits) - 1);
	for (uint32_t c = 0; c < d; c++)
		kvt_mse_group(x + c, x_stride, ntok, pin, qmax, sdt, scale + c, zero + c, codes8 + c,
			      d);
}

static void s_pack(const uint8_t *codes8, uint32_t d, uint32_t bits, uint8_t *out)
{
	if (bits == 3) {
		/* two planes (CHUNK_FORMAT.md): the low 2 bits as a 2-bit row in bytes [0, d/4),
		 * the high bit of channel c at bit c % 8 of byte d/4 + c/8 */
		for (uint32_t i = 0; i < d / 4; i++) {
			uint32_t b = 0;
			for (uint32_t k = 0; k < 4; k++)
				b |= ((uint32_t)codes8[i * 4 + k] & 3u) << (k * 2);
			out[i] = (uint8_t)b;
		}
		for (uint32_t i = 0; i < d / 8; i++) {
			uint32_t b = 0;
			for (uint32_t k = 0; k < 8; k++)
				b |= (((uint32_t)codes8[i * 8 + k] >> 2) & 1u) << k;
			out[d / 4 + i] = (uint8_t)b;
		}
		return;
	}
	uint32_t per = 8 / bits;
	for (uint32_t i = 0; i < d / per; i++) {
		uint32_t b = 0;
		for (uint32_t k = 0; k < per; k++)
			b |= (uint32_t)codes8[i * per + k] << (k * bits);
		out[i] = (uint8_t)b;
	}
}

/* code of channel c of a packed row of d channels */
static inline uint32_t code_at(const uint8_t *p, uint32_t c, uint32_t bits, uint32_t d)
{
	if (bits == 3)
		return ((p[c / 4] >> ((c % 4) * 2)) & 3u) | (((p[d / 4 + c / 8] >> (c % 8)) & 1u) << 2);
	uint32_t per = 8 / bits;
	return (p[c / per] >> ((c % per) * bits)) & ((1u << bits) - 1);
}

static void s_unpack_f32(const uint8_t *packed, uint32_t d, uint32_t bits, float *y)
{
	for (uint32_t c = 0; c < d; c++)
		y[c] = (float)code_at(packed, c, bits, d);
}

static void s_dequant_ch(const uint8_t *packed, uint32_t d, uint32_t bits, const float *s,
			 const float *z, float *y)
{
	for (uint32_t c = 0; c < d; c++)
		y[c] = (float)code_at(packed, c, bits, d) * s[c] + z[c];
}

static void s_dequant_grp(const uint8_t *packed, uint32_t d, uint32_t bits, uint32_t gv,
			  const uint16_t *s, const uint16_t *z, uint32_t sdt, float *y)
{
	for (uint32_t g = 0; g < d / gv; g++) {
		float sf = kvt_widen16(s[g], sdt), zf = kvt_widen16(z[g], sdt);
		for (uint32_t c = g * gv; c < (g + 1) * gv; c++)
			y[c] = (float)code_at(packed, c, bits, d) * sf + zf;
	}
}

static void s_decode_row(const uint8_t *packed, uint32_t d, uint32_t bits, uint32_t gv,
			 const uint16_t *s16, const uint16_t *z16, uint32_t sdt, bool rot, float mult,
			 void *out, uint32_t out_dtype)
{
	float tmp[256], sf[256], zf[256];
	uint32_t np = d / gv;
	for (uint32_t g = 0; g < np; g++) {
		sf[g] = kvt_widen16(s16[g], sdt);
		zf[g] = kvt_widen16(z16[g], sdt);
	}
	const uint32_t gshift = (uint32_t)__builtin_ctz(gv); /* gv is a power of two */
	for (uint32_t c = 0; c < d; c++)
		tmp[c] = (float)code_at(packed, c, bits, d) * sf[c >> gshift] + zf[c >> gshift];
	if (rot)
		s_fwht(tmp, 1, d, mult);
	s_store_f32(tmp, out, out_dtype, d);
}

static void s_decode_rows(const struct kvt_decode_rows *j)
{
	const size_t np = j->gv == 1 ? 0 : j->d / j->gv;
	for (uint32_t r = 0; r < j->n; r++) {
		if (j->pidx && j->pidx[r] >= 0)
			continue;
		for (uint32_t h = 0; h < j->n_heads; h++) {
			const size_t pp = h * j->head_params + r * np;
			s_decode_row(j->codes + h * j->head_codes + r * j->code_stride, j->d, j->bits,
				     j->gv, j->s16 + pp, j->z16 + pp, j->sdt, j->rot,
				     j->norms ? j->norms[r] * j->mult : j->mult,
				     j->out + h * j->head_out + r * j->out_stride, j->out_dtype);
		}
	}
}

static void s_dot_rows(const float *w, size_t w_stride, uint32_t nrows, const float *x,
		       uint32_t d, float *out)
{
	for (uint32_t i = 0; i < nrows; i++)
		out[i] = s_dot(w + i * w_stride, x, d);
}

static void s_accum_grp(const uint8_t *packed, uint32_t d, uint32_t bits, uint32_t gv,
			const uint16_t *s16, const uint16_t *z16, uint32_t sdt, const float *p,
			size_t p_stride, uint32_t nrows, float *acc, size_t acc_stride)
{
	float v[256];
	s_dequant_grp(packed, d, bits, gv, s16, z16, sdt, v);
	for (uint32_t i = 0; i < nrows; i++)
		s_axpy(acc + i * acc_stride, v, p[i * p_stride], d);
}

const struct kvt_codec_ops kvt_codec_ops_scalar = {
	.dot_rows = s_dot_rows,
	.accum_grp = s_accum_grp,
	.decode_row = s_decode_row,
	.decode_rows = s_decode_rows,
	.name = "scalar",
	.load_f32 = s_load_f32,
	.store_f32 = s_store_f32,
	.fwht = s_fwht,
	.sumsq = s_sumsq,
	.div = s_div,
	.dot = s_dot,
	.axpy = s_axpy,
	.quant_cols = s_quant_cols,
	.quant_rows = s_quant_rows,
	.mse_cols = s_mse_cols,
	.pack = s_pack,
	.dequant_ch = s_dequant_ch,
	.dequant_grp = s_dequant_grp,
	.unpack_f32 = s_unpack_f32,
};
