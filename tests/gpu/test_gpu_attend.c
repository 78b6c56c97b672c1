/*
 * test_gpu_attend.c - GPU decode attention against the CPU (OSCAR.md section 3).
 *
 * Fresh random batches each run: several sessions of one codec (every scheme, 2/3/4/8-bit
 * keys and values, equal or not, G, B, head_dim 64/128/256, wire dtype, GQA ratio 1..8,
 * f16/bf16/f32 queries), each with a random number of CPU-encoded chunks (the first holds
 * pinned sinks) and a random exact tail, plus the 3-bit-key preset's shape, the INT2 kernel's
 * shapes (fast batches, bf16 and f16, GQA 1-8) and the packed tensor-core kernel's (d64 /
 * d256, INT8, hadamard INT2 / INT4; each batch must take the kernel its shape selects);
 * attended in one batched launch. The reference is naive attention in double over kvt_decode_chunk's output
 * and the tail; the GPU's relative error ||o - ref|| / ||ref|| must be <= 1e-3 (fp32
 * accumulation). kvt_attend (the CPU kernel) is checked against the same reference. Exits
 * 77 when there is no GPU.
 */
#include "gpu_test_util.h"

static kvt_cuda_ctx *ctx;
static double worst_gpu, worst_cpu, worst_fast;

struct sess {
	uint32_t n_chunks, n_tail, layer;
	uint8_t **chunks;      /* host */
	void **chunks_dev;
	struct kvt_chunk_header *hdrs;
	const struct kvt_chunk_header **hdr_ptrs;
	void *tail_k, *tail_v; /* host [n_tail][H][d] of the layer */
	void *tail_k_dev, *tail_v_dev; /* allocations; the tail starts tail_off bytes in */
	size_t tail_off;       /* 0, or one element: rows that are not 16-byte aligned */
	void *q;               /* host, q dtype */
	void *q_dev;
	float *out_dev;
	float *ref;            /* [n_q_heads][d] */
};

static void reference(const struct kvt_codec_config *cfg, struct sess *s, uint32_t nq,
		      uint32_t q_dtype, float scale, float *qf)
{
	uint32_t B = cfg->chunk_tokens, H = cfg->n_kv_heads, d = cfg->head_dim;
	size_t ntok = (size_t)s->n_chunks * B + s->n_tail, row = (size_t)H * d;
	float *K = malloc(ntok * row * 4), *V = malloc(ntok * row * 4);
	char err[256];
	for (uint32_t c = 0; c < s->n_chunks; c++)
		KVT_CHECK(kvt_decode_chunk(s->chunks[c], 0, B, s->layer, s->layer + 1, KVT_DTYPE_F32,
					   K + (size_t)c * B * row, V + (size_t)c * B * row, err,
					   sizeof(err)) == 0,
			  "decode: %s", err);
	kvt_convert(s->tail_k, cfg->dtype, K + (size_t)s->n_chunks * B * row, KVT_DTYPE_F32,
		    s->n_tail * row);
	kvt_convert(s->tail_v, cfg->dtype, V + (size_t)s->n_chunks * B * row, KVT_DTYPE_F32,
		    s->n_tail * row);
	kvt_convert(s->q, q_dtype, qf, KVT_DTYPE_F32, (size_t)nq * d);
	naive_attention(qf, nq, K, V, ntok, H, d, scale, s->ref);
	free(K);
	free(V);
}

/*
 * fast: the shapes of the INT2 scales-on-codes kernel (oscar or kivi, INT2 or 3-bit keys with
 * 2-bit values (fast_kb), bf16 or f16 (fast_dtype), head_dim 128, <= 4 query heads per KV
 * head), with up to 12 chunks a session and items forced to
 * span 1-4 chunks, so that warps walk many units (double-buffered staging, key groups
 * changing inside and across chunks); half of them with the combine fused into the
 * attention kernel.
 */
/* chunks with pinned tokens in the INT2 batches, and their pinned tokens (printed) */
static uint64_t fast_pinned_chunks, fast_pinned_tokens;
/* key bits of the fast batches: 2 (INT2), or 3 (3-bit keys, 2-bit values: kvtier-int2) */
static uint32_t fast_kb = 2;
/* their sessions' dtype: bf16, or f16 (the swapped loop's f16 form, session 21) */
static uint32_t fast_dtype = KVT_DTYPE_BF16;
/* fast batches with more than 4 query heads per KV head (the INT2 kernel cuts them into groups
 * of 4 since session 21, unless KVTIER_CUDA_I2_GQA_SPLIT=0) */
static uint32_t fast_gqa_split;

static bool gqa_split_on(void)
{
	const char *e = getenv("KVTIER_CUDA_I2_GQA_SPLIT");
	return !e || atoi(e) != 0;
}
/* batches per kernel (enum kvt_cuda_attend_kernel), counted from the plans */
static uint32_t kernel_count[KVT_CUDA_ATT_EXACT_MMA + 1];
static uint32_t n_chained; /* plans whose INT2 kernel is chained with early runs on: their third run was early */
static uint64_t n_folded_tails; /* tail tokens the INT2 kernel's coded items attended */
static uint64_t n_folded_tails_tc; /* ... of them on tensor cores (i3_tail_mma) */
static bool aligned_tails; /* every tail 16-byte aligned (the exact rows' kernel needs it) */
static uint32_t max_tail;  /* tails up to this many tokens where set (else < B) */
static uint32_t long_tail; /* where set, every tail long_tail + 0..75 tokens */
/* where set, an op on this ctx (another device) right before each run: the run must make its
 * own ctx's device current again */
static kvt_cuda_ctx *switch_ctx;

static void switch_device(void)
{
	char err[256];
	void *other = NULL;
	if (!switch_ctx)
		return;
	int rc = kvt_cuda_alloc(switch_ctx, 256, &other, err, sizeof(err));
	KVT_CHECK(rc == 0, "alloc on the other device: %s", err);
	if (!rc)
		kvt_cuda_free(switch_ctx, other); /* switch_ctx's device is current now */
}

static void one_batch(int iter, bool fast, const struct kvt_codec_config *fixed, uint32_t fixed_r)
{
	struct kvt_codec_config cfg;
	/* half the random batches with different key and value bits: the splits the GPU
	 * kernel takes (3 on one side, 2-4 on the other) */
	do
		random_config(&cfg, kvt_rand_below(2) == 0);
	while (cfg.key_bits != cfg.value_bits &&
	       !((cfg.key_bits == 3 || cfg.value_bits == 3) && cfg.key_bits <= 4 &&
		 cfg.value_bits <= 4));
	if (fixed)
		cfg = *fixed;
	static const uint32_t ratios[] = {1, 2, 4, 8, 4};
	static const uint32_t qdts[] = {KVT_DTYPE_F16, KVT_DTYPE_BF16, KVT_DTYPE_F32};
	uint32_t R = fixed ? fixed_r : ratios[kvt_rand_below(5)];
	bool solo = false;
	const uint32_t q_dtype = qdts[kvt_rand_below(3)];
	if (fast) {
		cfg.scheme = kvt_rand_below(4) ? KVT_SCHEME_OSCAR : KVT_SCHEME_KIVI;
		cfg.key_bits = fast_kb;
		cfg.value_bits = 2;
		cfg.dtype = fast_dtype;
		cfg.head_dim = 128;
		cfg.rotate_v = cfg.scheme == KVT_SCHEME_OSCAR ? kvt_rand_below(4) != 0 : 0;
		R = ratios[kvt_rand_below(3)];
		if (kvt_rand_below(2))
			R = 4;
		else if (kvt_rand_below(3) == 0 && gqa_split_on()) {
			/* 5-8 query heads per KV head: two groups of query heads, each its own
			 * items (session 21) */
			R = 5 + kvt_rand_below(4);
			fast_gqa_split++;
		}
		char cpi[16];
		snprintf(cpi, sizeof(cpi), "%u", 1 + kvt_rand_below(4));
		setenv("KVTIER_CUDA_CPI", cpi, 1);
		/* the combine: a quarter each the plan's choice, the separate kernel, the fused
		 * combine, the output written by the item's merge (where every group is one
		 * item, else the fused combine) */
		const uint32_t fc = kvt_rand_below(4);
		if (fc) {
			char fv[8];
			snprintf(fv, sizeof(fv), "%u", fc - 1);
			setenv("KVTIER_CUDA_FUSED_COMBINE", fv, 1);
		}
		/* the separate combine: a third each the plan's choice, every load of a batch
		 * issued at once (1), the form before session 10 (0) */
		const uint32_t ca = kvt_rand_below(3);
		if (ca)
			setenv("KVTIER_CUDA_COMBINE_ALL", ca == 1 ? "1" : "0", 1);
		/* the folded tail: a third each the plan's choice (tensor cores where every group
		 * is one item), tensor cores for any folded tail (1), CUDA cores (0) */
		if (iter % 3)
			setenv("KVTIER_CUDA_TAIL_TC", iter % 3 == 1 ? "1" : "0", 1);
		/* a quarter with one chunk and no tail per session: every group one item */
		solo = kvt_rand_below(4) == 0;
		/* a third pin tokens in any chunk (pin detection): items whose folded pins
		 * come from several chunks, more than the 8 rows the kernel stages */
		if (kvt_rand_below(3) == 0) {
			cfg.pin_detect_ratio = 0.9f;
			cfg.pin_detect_max = 1 + kvt_rand_below(12);
		}
	}
	const uint32_t B = cfg.chunk_tokens, L = cfg.n_layers, H = cfg.n_kv_heads,
		       d = cfg.head_dim, nq = H * R;
	const size_t ws = kvt_dtype_size(cfg.dtype), qs = kvt_dtype_size(q_dtype);
	const size_t cap = kvt_chunk_max_bytes(&cfg), row = (size_t)H * d;
	const uint32_t n_sess = 1 + kvt_rand_below(4);
	const float scale = 1.0f / sqrtf((float)d);
	char desc[200], err[256];
	describe(&cfg, desc, sizeof(desc));
	struct sess *ss = calloc(n_sess, sizeof(*ss));
	struct kvt_cuda_attend_request *reqs = calloc(n_sess, sizeof(*reqs));
	float *qf = malloc((size_t)nq * d * 4), *out = malloc((size_t)nq * d * 4);
	float *qcpu = malloc((size_t)nq * d * 4);
	int rc = 0;
	for (uint32_t si = 0; si < n_sess && !rc; si++) {
		struct sess *s = &ss[si];
		s->n_chunks = kvt_rand_below(fast ? 13 : fixed ? 24 : 6);
		/* the preset keeps up to W = recent_exact_tokens exact */
		s->n_tail = kvt_rand_below(fixed && cfg.recent_exact_tokens ? cfg.recent_exact_tokens + 1
				   : max_tail ? max_tail + 1 : B);
		if (long_tail)
			s->n_tail = long_tail + kvt_rand_below(76);
		if (s->n_chunks + s->n_tail == 0)
			s->n_tail = 1 + kvt_rand_below(B - 1);
		if (solo) {
			s->n_chunks = 1;
			s->n_tail = 0;
		}
		s->layer = kvt_rand_below(L);
		s->chunks = calloc(s->n_chunks + 1, sizeof(*s->chunks));
		s->chunks_dev = calloc(s->n_chunks + 1, sizeof(*s->chunks_dev));
		s->hdrs = calloc(s->n_chunks + 1, sizeof(*s->hdrs));
		s->hdr_ptrs = calloc(s->n_chunks + 1, sizeof(*s->hdr_ptrs));
		size_t nk = (size_t)L * B * row;
		void *k = malloc(nk * ws), *v = malloc(nk * ws);
		for (uint32_t c = 0; c < s->n_chunks && !rc; c++) {
			random_kv(&cfg, (uint64_t)c * B, B, k, v);
			s->chunks[c] = malloc(cap);
			int64_t n = kvt_encode_chunk(&cfg, (uint64_t)c * B, k, v, s->chunks[c], cap, err,
						     sizeof(err));
			KVT_CHECK(n > 0, "%s: encode: %s", desc, err);
			if (n <= 0) {
				rc = -1;
				break;
			}
			memcpy(&s->hdrs[c], s->chunks[c], sizeof(s->hdrs[c]));
			if (fast && s->hdrs[c].n_pinned) {
				fast_pinned_chunks++;
				fast_pinned_tokens += s->hdrs[c].n_pinned;
			}
			s->hdr_ptrs[c] = &s->hdrs[c];
			rc = kvt_cuda_alloc(ctx, (size_t)n, &s->chunks_dev[c], err, sizeof(err));
			rc = rc ? rc : kvt_cuda_upload(ctx, s->chunks_dev[c], s->chunks[c], (size_t)n, err, sizeof(err));
		}
		/* the tail: tokens after the chunks, this layer only */
		size_t tb = (size_t)(s->n_tail ? s->n_tail : 1) * row * ws;
		s->tail_k = malloc(tb);
		s->tail_v = malloc(tb);
		if (s->n_tail) {
			struct kvt_codec_config c1 = cfg;
			c1.n_layers = 1;
			random_kv(&c1, (uint64_t)s->n_chunks * B, s->n_tail, s->tail_k, s->tail_v);
		}
		/* a quarter of the tails one element off 16-byte alignment: the kernels' exact rows
		 * take vector loads where rows are aligned, element loads where not */
		s->tail_off = !aligned_tails && kvt_rand_below(4) == 0 ? ws : 0;
		rc = rc ? rc : kvt_cuda_alloc(ctx, tb + 16, &s->tail_k_dev, err, sizeof(err));
		rc = rc ? rc : kvt_cuda_alloc(ctx, tb + 16, &s->tail_v_dev, err, sizeof(err));
		rc = rc ? rc : kvt_cuda_upload(ctx, (uint8_t *)s->tail_k_dev + s->tail_off, s->tail_k, tb,
					       err, sizeof(err));
		rc = rc ? rc : kvt_cuda_upload(ctx, (uint8_t *)s->tail_v_dev + s->tail_off, s->tail_v, tb,
					       err, sizeof(err));
		/* queries: the keys' scale, so logits spread like a model's */
		for (size_t i = 0; i < (size_t)nq * d; i++)
			qf[i] = 1.5f * kvt_rand_normal();
		s->q = malloc((size_t)nq * d * qs);
		kvt_convert(qf, KVT_DTYPE_F32, s->q, q_dtype, (size_t)nq * d);
		rc = rc ? rc : kvt_cuda_alloc(ctx, (size_t)nq * d * qs, &s->q_dev, err, sizeof(err));
		rc = rc ? rc : kvt_cuda_upload(ctx, s->q_dev, s->q, (size_t)nq * d * qs, err, sizeof(err));
		rc = rc ? rc : kvt_cuda_alloc(ctx, (size_t)nq * d * 4, (void **)&s->out_dev, err, sizeof(err));
		rc = rc ? rc : kvt_cuda_memset_async(ctx, s->out_dev, 0xff, (size_t)nq * d * 4, err, sizeof(err));
		s->ref = malloc((size_t)nq * d * 4);
		free(k);
		free(v);
		reqs[si] = (struct kvt_cuda_attend_request){
			.cfg = &cfg, .layer = s->layer, .n_q_heads = nq, .softmax_scale = scale,
			.q_dev = s->q_dev, .q_dtype = q_dtype,
			.chunks_dev = (const void *const *)s->chunks_dev, .chunk_hdrs = s->hdr_ptrs,
			.n_chunks = s->n_chunks,
			.tail_k_dev = (const uint8_t *)s->tail_k_dev + s->tail_off,
			.tail_v_dev = (const uint8_t *)s->tail_v_dev + s->tail_off, .n_tail = s->n_tail,
			.out_dev = s->out_dev};
	}
	KVT_CHECK(rc == 0, "%s: setup: %s", desc, err);
	if (!rc) {
		kvt_cuda_attend_plan *pl = NULL;
		rc = kvt_cuda_attend_plan_build(ctx, reqs, n_sess, &pl, err, sizeof(err));
		if (!rc) {
			struct kvt_cuda_attend_plan_info info;
			kvt_cuda_attend_plan_info(pl, &info);
			if (info.kernel <= KVT_CUDA_ATT_EXACT_MMA)
				kernel_count[info.kernel]++;
			/* the INT2 kernel folds every 16-byte aligned tail of a session with chunks
			 * into its coded items (every token once per group of query heads); no other
			 * plan does */
			const bool i2k = info.kernel == KVT_CUDA_ATT_KEYS_AS_B ||
					 info.kernel == KVT_CUDA_ATT_SWAPPED;
			uint64_t want_folded = 0;
			for (uint32_t si = 0; si < n_sess && i2k; si++)
				if (ss[si].n_chunks && ss[si].n_tail && !ss[si].tail_off)
					want_folded += (uint64_t)H * ((R + 3) / 4) * ss[si].n_tail;
			KVT_CHECK(info.folded_tail_tokens == want_folded,
				  "%s: %" PRIu64 " folded tail tokens, want %" PRIu64, desc,
				  info.folded_tail_tokens, want_folded);
			n_folded_tails += info.folded_tail_tokens;
			/* ... on tensor cores: the swapped loop's plans whose groups are one item
			 * each, or all of them with KVTIER_CUDA_TAIL_TC=1, none with =0 */
			const char *ttc = getenv("KVTIER_CUDA_TAIL_TC");
			const bool want_tc = info.kernel == KVT_CUDA_ATT_SWAPPED && want_folded &&
					     (ttc ? atoi(ttc) != 0 : info.n_items == info.n_groups);
			KVT_CHECK(info.tail_on_tensor_cores == (want_tc ? 1u : 0u),
				  "%s: folded tail on tensor cores %u, want %d (KVTIER_CUDA_TAIL_TC %s, "
				  "%u items, %u groups)", desc, info.tail_on_tensor_cores, want_tc,
				  ttc ? ttc : "unset", info.n_items, info.n_groups);
			if (info.tail_on_tensor_cores)
				n_folded_tails_tc += info.folded_tail_tokens;
			switch_device();
			rc = kvt_cuda_attend_run(ctx, pl, err, sizeof(err));
			/* a plan runs once per decode step: run it again over cleared outputs (what
			 * one run leaves in the plan, e.g. the fused combine's group counters, must
			 * not change the next one's result) and check the second run's outputs */
			for (uint32_t si = 0; si < n_sess && !rc; si++)
				rc = kvt_cuda_memset_async(ctx, ss[si].out_dev, 0xff,
							   (size_t)nq * d * 4, err, sizeof(err));
			switch_device();
			rc = rc ? rc : kvt_cuda_attend_run(ctx, pl, err, sizeof(err));
			/* and a third time right after it (the INT2 kernel then is the programmatic
			 * dependent of the second run's last kernel) */
			switch_device();
			rc = rc ? rc : kvt_cuda_attend_run(ctx, pl, err, sizeof(err));
			rc = rc ? rc : kvt_cuda_sync(ctx, err, sizeof(err));
			/* that third run, right after an attention run, is an early one where the
			 * INT2 kernel is chained and early runs are on (KVTIER_CUDA_EARLY=0 turns
			 * them off): its first units copied before its wait; the second followed a
			 * memset, the first the plan build: never early */
			struct kvt_cuda_attend_plan_info after;
			kvt_cuda_attend_plan_info(pl, &after);
			if (!rc && after.early)
				n_chained++;
			KVT_CHECK(rc || !after.early || after.chained, "%s: early without chained", desc);
			KVT_CHECK(rc || after.early_runs == (after.early ? 1u : 0u),
				  "%s: %u early runs of 3, want %u (chained %u, early %u)", desc,
				  after.early_runs, after.early ? 1u : 0u, after.chained, after.early);
			kvt_cuda_attend_plan_destroy(pl);
		}
		KVT_CHECK(rc == 0, "%s: kvt_cuda_attend: %s", desc, err);
	}
	unsetenv("KVTIER_CUDA_CPI");
	unsetenv("KVTIER_CUDA_FUSED_COMBINE");
	unsetenv("KVTIER_CUDA_COMBINE_ALL");
	unsetenv("KVTIER_CUDA_TAIL_TC");
	for (uint32_t si = 0; si < n_sess && !rc; si++) {
		struct sess *s = &ss[si];
		rc = kvt_cuda_download(ctx, out, s->out_dev, (size_t)nq * d * 4, err, sizeof(err));
		KVT_CHECK(rc == 0, "download: %s", err);
		reference(&cfg, s, nq, q_dtype, scale, qf);
		double e = rel_err(out, s->ref, (size_t)nq * d);
		if (e > worst_gpu)
			worst_gpu = e;
		if (fast && e > worst_fast)
			worst_fast = e;
		KVT_CHECK(e <= 1e-3, "%s R%u q %s: session %u (%u chunks + %u tail, layer %u): GPU "
			  "relative error %.3e", desc, R, kvt_dtype_name(q_dtype), si, s->n_chunks,
			  s->n_tail, s->layer, e);
		/* the CPU kernel on the same inputs */
		kvt_convert(s->q, q_dtype, qcpu, KVT_DTYPE_F32, (size_t)nq * d);
		struct kvt_attend_request cr = {
			.cfg = &cfg, .layer = s->layer, .n_q_heads = nq, .softmax_scale = scale,
			.q = qcpu, .chunks = (const void *const *)s->chunks, .n_chunks = s->n_chunks,
			.tail_k = s->tail_k, .tail_v = s->tail_v, .n_tail = s->n_tail, .out = out};
		if (kvt_attend(&cr, 1, err, sizeof(err)) == 0) {
			double ec = rel_err(out, s->ref, (size_t)nq * d);
			if (ec > worst_cpu)
				worst_cpu = ec;
		}
		if (iter < 3 || e > 1e-3)
			printf("# %s R%u q %s: %u chunks + %u tail: gpu rel err %.2e\n", desc, R,
			       kvt_dtype_name(q_dtype), s->n_chunks, s->n_tail, e);
	}
	for (uint32_t si = 0; si < n_sess; si++) {
		struct sess *s = &ss[si];
		for (uint32_t c = 0; c < s->n_chunks; c++) {
			free(s->chunks[c]);
			kvt_cuda_free(ctx, s->chunks_dev[c]);
		}
		free(s->chunks);
		free(s->chunks_dev);
		free(s->hdrs);
		free(s->hdr_ptrs);
		free(s->tail_k);
		free(s->tail_v);
		kvt_cuda_free(ctx, s->tail_k_dev);
		kvt_cuda_free(ctx, s->tail_v_dev);
		free(s->q);
		kvt_cuda_free(ctx, s->q_dev);
		kvt_cuda_free(ctx, s->out_dev);
		free(s->ref);
	}
	free(ss);
	free(reqs);
	free(qf);
	free(qcpu);
	free(out);
}

static void test_random_batches(void)
{
	int n = 40;
	const char *s = getenv("KVT_GPU_BATCHES");
	if (s && *s)
		n = atoi(s);
	for (int i = 0; i < n; i++)
		one_batch(i, false, NULL, 0);
	printf("# worst relative error: gpu %.3e, cpu kvt_attend %.3e\n", worst_gpu, worst_cpu);
}

/* the tensor-core INT2 kernel takes bf16 d128 batches of these key bits (no switch turned it
 * off) */
static bool i2_kernel_on(uint32_t key_bits)
{
	return !getenv("KVTIER_CUDA_NO_MMA") && !getenv("KVTIER_CUDA_NO_I2") &&
	       (key_bits != 3 || !getenv("KVTIER_CUDA_NO_K3_MMA"));
}

/* n fast batches of fast_kb key bits under both unit loops of the INT2 kernel: the keys-as-B
 * key orientation (KVTIER_CUDA_I2_SWAP=0) and the swapped one (=1: keys as the A operand, p
 * through movmatrix), each with fresh batches, and each batch on the kernel its setting
 * names; a KVTIER_CUDA_I2_SWAP set by the caller picks one of them. */
static void fast_batches_both_loops(const char *what, int n)
{
	const char *fixed = getenv("KVTIER_CUDA_I2_SWAP");
	for (int sw = 0; sw < 2; sw++) {
		if (fixed && sw)
			break;
		if (!fixed)
			setenv("KVTIER_CUDA_I2_SWAP", sw ? "1" : "0", 1);
		const bool swapped = fixed ? atoi(fixed) != 0 : sw;
		const uint32_t want = swapped ? KVT_CUDA_ATT_SWAPPED : KVT_CUDA_ATT_KEYS_AS_B;
		const double before = worst_fast;
		const uint64_t pc = fast_pinned_chunks, pt = fast_pinned_tokens;
		const uint32_t k0 = kernel_count[want];
		worst_fast = 0.0;
		for (int i = 0; i < n; i++)
			one_batch(i, true, NULL, 0);
		const uint32_t got = kernel_count[want] - k0;
		printf("# worst relative error, %s bf16 d128 batches, KVTIER_CUDA_I2_SWAP=%s: gpu "
		       "%.3e (%llu chunks with %llu pinned tokens; %u of %d batches on the %s loop)\n",
		       what, fixed ? fixed : sw ? "1" : "0", worst_fast,
		       (unsigned long long)(fast_pinned_chunks - pc),
		       (unsigned long long)(fast_pinned_tokens - pt), got, n,
		       swapped ? "swapped" : "keys-as-B");
		if (i2_kernel_on(fast_kb))
			KVT_CHECK(got == (uint32_t)n, "%s: every batch takes the %s loop (%u of %d)",
				  what, swapped ? "swapped" : "keys-as-B", got, n);
		worst_fast = worst_fast > before ? worst_fast : before;
	}
	if (!fixed)
		unsetenv("KVTIER_CUDA_I2_SWAP");
}

static void test_fast_path_batches(void)
{
	int n = 24;
	const char *s = getenv("KVT_GPU_FAST_BATCHES");
	if (s && *s)
		n = atoi(s);
	const uint64_t folded0 = n_folded_tails, tc0 = n_folded_tails_tc;
	const uint32_t g0 = fast_gqa_split;
	fast_batches_both_loops("INT2", n);
	printf("# INT2 fast batches with 5-8 query heads per KV head: %u\n", fast_gqa_split - g0);
	/* most fast batches have sessions with chunks and an aligned tail, and a third of the
	 * swapped loop's take the tensor-core tail (KVTIER_CUDA_TAIL_TC=1) */
	KVT_CHECK(n < 8 || n_folded_tails > folded0, "INT2 fast batches: no tail was folded");
	const char *sw = getenv("KVTIER_CUDA_I2_SWAP");
	KVT_CHECK(n < 8 || !i2_kernel_on(2) || (sw && !atoi(sw)) || n_folded_tails_tc > tc0,
		  "INT2 fast batches: no folded tail on tensor cores");
}

/* The fast batches with 3-bit keys and 2-bit values (oscar or kivi, bf16, head_dim 128, G 32,
 * 64 or 128): the INT2 kernel's 3-bit key path under both unit loops, unless switched off. */
static void test_k3_fast_batches(void)
{
	int n = 16;
	const char *s = getenv("KVT_GPU_FAST_BATCHES");
	if (s && *s)
		n = atoi(s);
	fast_kb = 3;
	fast_batches_both_loops("K3 V2", n);
	fast_kb = 2;
}

/* The fast batches in f16 sessions (session 21): INT2 and K3 V2 on the swapped loop's f16 form
 * (each f16 scale split into two exact parts, one MMA each), pins and folded tails (f16 rows)
 * included; the keys-as-B loop has no f16 form, so KVTIER_CUDA_I2_SWAP=0 must leave f16
 * sessions to the packed tensor-core kernel. KVTIER_CUDA_NO_I2_F16=1 does that for both (A/B
 * runs). */
static void test_f16_fast_batches(void)
{
	int n = 16;
	const char *s = getenv("KVT_GPU_F16_BATCHES");
	if (s && *s)
		n = atoi(s);
	const bool on = !getenv("KVTIER_CUDA_NO_I2_F16") && !getenv("KVTIER_CUDA_NO_MMA");
	const char *fixed = getenv("KVTIER_CUDA_I2_SWAP");
	fast_dtype = KVT_DTYPE_F16;
	for (uint32_t kb = 2; kb <= 3; kb++) {
		fast_kb = kb;
		const bool kon = on && i2_kernel_on(kb) && (!fixed || atoi(fixed) != 0);
		const uint32_t sw0 = kernel_count[KVT_CUDA_ATT_SWAPPED];
		const uint64_t f0 = n_folded_tails, ftc0 = n_folded_tails_tc;
		const uint64_t pt0 = fast_pinned_tokens;
		const double before = worst_fast;
		worst_fast = 0.0;
		for (int i = 0; i < n; i++)
			one_batch(i, true, NULL, 0);
		const uint32_t got = kernel_count[KVT_CUDA_ATT_SWAPPED] - sw0;
		printf("# worst relative error, %s f16 d128 batches: gpu %.3e (%u of %d on the swapped "
		       "loop; %llu pinned tokens, %llu folded tail tokens, %llu of them on tensor "
		       "cores)\n", kb == 2 ? "INT2" : "K3 V2", worst_fast, got, n,
		       (unsigned long long)(fast_pinned_tokens - pt0),
		       (unsigned long long)(n_folded_tails - f0),
		       (unsigned long long)(n_folded_tails_tc - ftc0));
		if (kon) {
			KVT_CHECK(got == (uint32_t)n, "%s f16: every batch takes the swapped loop (%u "
				  "of %d)", kb == 2 ? "INT2" : "K3 V2", got, n);
			KVT_CHECK(n < 8 || (n_folded_tails > f0 && n_folded_tails_tc > ftc0),
				  "%s f16: folded tails on CUDA cores and on tensor cores",
				  kb == 2 ? "INT2" : "K3 V2");
		}
		worst_fast = worst_fast > before ? worst_fast : before;
		/* the keys-as-B loop: no f16 form, the packed kernel takes them */
		if (!fixed && n >= 2) {
			setenv("KVTIER_CUDA_I2_SWAP", "0", 1);
			const uint32_t p0 = kernel_count[KVT_CUDA_ATT_MMA];
			one_batch(0, true, NULL, 0);
			one_batch(1, true, NULL, 0);
			unsetenv("KVTIER_CUDA_I2_SWAP");
			if (!getenv("KVTIER_CUDA_NO_MMA") && (kb == 2 || !getenv("KVTIER_CUDA_NO_K3_MMA")))
				KVT_CHECK(kernel_count[KVT_CUDA_ATT_MMA] - p0 == 2,
					  "%s f16 with KVTIER_CUDA_I2_SWAP=0: the packed kernel (%u of 2)",
					  kb == 2 ? "INT2" : "K3 V2", kernel_count[KVT_CUDA_ATT_MMA] - p0);
		}
	}
	fast_kb = 2;
	fast_dtype = KVT_DTYPE_BF16;
}

/* The default codec's shape (oscar K3 V2 G64 B64 S8 W128; SmolLM2-135M: L30 H3 d64, 9 query
 * heads, f16) and d128 variants (f16, bf16; GQA 3 and 4), up to 23 chunks + 128 tail tokens
 * per session: the packed tensor-core kernel's 3-bit key path for d64 (since session 15; the
 * CUDA-core kernel before), the tensor-core INT2 kernel for d128 with <= 4 query heads per KV
 * head (bf16: either unit loop; f16: the swapped loop, since session 21). */
static uint32_t tensor_core_i2_count(void)
{
	return kernel_count[KVT_CUDA_ATT_KEYS_AS_B] + kernel_count[KVT_CUDA_ATT_SWAPPED];
}

static void test_k3_preset_batches(void)
{
	struct kvt_codec_config cfg;
	const double before = worst_gpu;
	const uint32_t cc0 = kernel_count[KVT_CUDA_ATT_CUDA_CORES], tc0 = tensor_core_i2_count();
	const uint32_t pk0 = kernel_count[KVT_CUDA_ATT_MMA];
	worst_gpu = 0.0;
	for (int i = 0; i < 4; i++) {
		k3_preset_config(&cfg, 30, 3, 64, KVT_DTYPE_F16);
		one_batch(i, false, &cfg, 3);
	}
	const uint32_t pk = kernel_count[KVT_CUDA_ATT_MMA] - pk0;
	const uint32_t f0 = kernel_count[KVT_CUDA_ATT_SWAPPED];
	k3_preset_config(&cfg, 30, 3, 128, KVT_DTYPE_F16);
	one_batch(0, false, &cfg, 3);
	one_batch(1, false, &cfg, 4);
	const uint32_t f16i2 = kernel_count[KVT_CUDA_ATT_SWAPPED] - f0;
	const uint32_t kab0 = tensor_core_i2_count();
	k3_preset_config(&cfg, 4, 8, 128, KVT_DTYPE_BF16);
	one_batch(0, false, &cfg, 4);
	one_batch(1, false, &cfg, 1);
	one_batch(2, false, &cfg, 2);
	const uint32_t kab = tensor_core_i2_count() - kab0;
	printf("# worst relative error, K3 V2 preset batches: gpu %.3e (%u CUDA-core, %u packed "
	       "tensor-core: %u of the 4 d64 batches, %u tensor-core INT2 kernel: %u of the 2 f16 "
	       "d128 and %u of the 3 bf16 d128 batches)\n", worst_gpu,
	       kernel_count[KVT_CUDA_ATT_CUDA_CORES] - cc0, kernel_count[KVT_CUDA_ATT_MMA] - pk0, pk,
	       tensor_core_i2_count() - tc0, f16i2, kab);
	if (!getenv("KVTIER_CUDA_NO_MMA") && !getenv("KVTIER_CUDA_NO_K3_MMA"))
		KVT_CHECK(pk == 4, "the d64 K3 V2 preset batches take the packed tensor-core "
			  "kernel (%u of 4)", pk);
	if (i2_kernel_on(3)) {
		KVT_CHECK(kab == 3, "the bf16 d128 K3 V2 preset batches take the tensor-core INT2 "
			  "kernel (%u of 3)", kab);
		const char *sw = getenv("KVTIER_CUDA_I2_SWAP");
		if (!getenv("KVTIER_CUDA_NO_I2_F16") && !(sw && !atoi(sw)))
			KVT_CHECK(f16i2 == 2, "the f16 d128 K3 V2 preset batches take the INT2 "
				  "kernel's swapped loop (%u of 2)", f16i2);
	}
	worst_gpu = worst_gpu > before ? worst_gpu : before;
}

/* One fixed-config batch (one_batch) whose own worst GPU error is returned; worst_gpu keeps
 * the running worst across it */
static double one_batch_worst(int iter, const struct kvt_codec_config *cfg, uint32_t r)
{
	const double w0 = worst_gpu;
	worst_gpu = 0.0;
	one_batch(iter, false, cfg, r);
	const double w = worst_gpu;
	worst_gpu = w > w0 ? w : w0;
	return w;
}

/* The packed tensor-core kernel's shapes beyond the INT2 kernel's (session 15; before, the
 * CUDA-core kernel took them): head_dim 64 and 256 with INT2, INT4 or 3-bit keys and 2-bit
 * values (the default codec; at head_dim 128 the INT2 kernel's since session 21, in f16
 * sessions and with 8 query heads per KV head too), and (session 19) INT8 at head_dim 64 and
 * 128; oscar or kivi, G 32 / 64 / 128,
 * fresh each run. Each batch must take that kernel
 * (unless KVTIER_CUDA_NO_MMA or, for K3 V2, KVTIER_CUDA_NO_K3_MMA) and match the reference. */
static void test_packed_mma_batches(void)
{
	int n = 20;
	const char *e = getenv("KVT_GPU_PACKED_BATCHES");
	if (e && *e)
		n = atoi(e);
	static const uint32_t ratios[] = {1, 2, 3, 4, 8};
	const double before = worst_gpu;
	const uint32_t m0 = kernel_count[KVT_CUDA_ATT_MMA];
	uint32_t want = 0, n_k[3] = {0, 0, 0};
	double worst_k[3] = {0.0, 0.0, 0.0}; /* INT2, INT4, INT8 */
	worst_gpu = 0.0;
	for (int i = 0; i < n; i++) {
		struct kvt_codec_config cfg;
		random_config(&cfg, true);
		cfg.scheme = kvt_rand_below(3) ? KVT_SCHEME_OSCAR : KVT_SCHEME_KIVI;
		/* 0: INT2, 1: INT4, 2: INT8 (d64 / d128 only; 8 query heads per KV head as two
		 * groups of 4), 3-4: K3 V2 */
		const uint32_t kind = kvt_rand_below(5);
		cfg.key_bits = kind == 0 ? 2 : kind == 1 ? 4 : kind == 2 ? 8 : 3;
		cfg.value_bits = kind == 1 ? 4 : kind == 2 ? 8 : 2;
		static const uint32_t dims[] = {64, 256}, dims8[] = {64, 128};
		cfg.head_dim = kind == 2 ? dims8[kvt_rand_below(2)] : dims[kvt_rand_below(2)];
		cfg.dtype = kvt_rand_below(2) ? KVT_DTYPE_BF16 : KVT_DTYPE_F16;
		uint32_t r = ratios[kvt_rand_below(5)];
		cfg.rotate_v = cfg.scheme == KVT_SCHEME_OSCAR ? kvt_rand_below(4) != 0 : 0;
		const bool off = getenv("KVTIER_CUDA_NO_MMA") ||
				 (cfg.key_bits == 3 && getenv("KVTIER_CUDA_NO_K3_MMA")) ||
				 (cfg.key_bits == 8 && getenv("KVTIER_CUDA_NO_INT8_MMA"));
		want += off ? 0u : 1u;
		const double w = one_batch_worst(i, &cfg, r);
		if (kind < 3) {
			worst_k[kind] = w > worst_k[kind] ? w : worst_k[kind];
			n_k[kind]++;
		}
	}
	const uint32_t got = kernel_count[KVT_CUDA_ATT_MMA] - m0;
	printf("# worst relative error, packed tensor-core batches (d64 / d256 INT2 / INT4 / K3 V2, "
	       "d64 / d128 INT8): gpu %.3e (%u of %d on that kernel; "
	       "INT2 %.3e in %u, INT4 %.3e in %u, INT8 %.3e in %u)\n",
	       worst_gpu, got, n, worst_k[0], n_k[0], worst_k[1], n_k[1], worst_k[2], n_k[2]);
	KVT_CHECK(got == want, "the packed tensor-core kernel takes these batches (%u, expected %u)",
		  got, want);
	worst_gpu = worst_gpu > before ? worst_gpu : before;
}

/* Hadamard on the packed tensor-core kernel (session 20; before, the CUDA-core kernel took
 * it): its per-token key groups (the scale on the codes, the zero through per-group query
 * sums), INT2 or INT4, head_dim 64 / 128 / 256, G 32 / 64 / 128, f16 or bf16, 1-8 query heads
 * per KV head, fresh each run. Each batch must take that kernel (unless KVTIER_CUDA_NO_MMA or
 * KVTIER_CUDA_NO_HAD_MMA) and match the reference; the random batches keep hadamard's other
 * widths (3-bit, 8-bit, splits) on the CUDA-core kernel. */
static void test_hadamard_mma_batches(void)
{
	int n = 16;
	const char *e = getenv("KVT_GPU_HAD_BATCHES");
	if (e && *e)
		n = atoi(e);
	static const uint32_t ratios[] = {1, 2, 3, 4, 8};
	static const uint32_t dims[] = {64, 128, 256, 128};
	const double before = worst_gpu;
	const uint32_t m0 = kernel_count[KVT_CUDA_ATT_MMA];
	uint32_t want = 0, n_k[2] = {0, 0};
	double worst_k[2] = {0.0, 0.0}; /* INT2, INT4 */
	worst_gpu = 0.0;
	for (int i = 0; i < n; i++) {
		struct kvt_codec_config cfg;
		random_config(&cfg, true);
		cfg.scheme = KVT_SCHEME_HADAMARD;
		const uint32_t kind = kvt_rand_below(2);
		cfg.key_bits = cfg.value_bits = kind ? 4 : 2;
		cfg.head_dim = dims[kvt_rand_below(4)];
		cfg.dtype = kvt_rand_below(2) ? KVT_DTYPE_BF16 : KVT_DTYPE_F16;
		cfg.rotate_v = kvt_rand_below(4) != 0;
		const bool off = getenv("KVTIER_CUDA_NO_MMA") || getenv("KVTIER_CUDA_NO_HAD_MMA");
		want += off ? 0u : 1u;
		const double w = one_batch_worst(i, &cfg, ratios[kvt_rand_below(5)]);
		worst_k[kind] = w > worst_k[kind] ? w : worst_k[kind];
		n_k[kind]++;
	}
	const uint32_t got = kernel_count[KVT_CUDA_ATT_MMA] - m0;
	printf("# worst relative error, hadamard batches (INT2 / INT4, d64 / d128 / d256): gpu %.3e "
	       "(%u of %d on the packed tensor-core kernel; INT2 %.3e in %u, INT4 %.3e in %u)\n",
	       worst_gpu, got, n, worst_k[0], n_k[0], worst_k[1], n_k[1]);
	KVT_CHECK(got == want, "the packed tensor-core kernel takes the hadamard batches (%u, "
		  "expected %u)", got, want);
	worst_gpu = worst_gpu > before ? worst_gpu : before;
}

/* Scheme none on the exact rows' tensor-core kernel (session 17): f16 or bf16 chunks,
 * head_dim 64 or 128, 1-16 query heads per KV head (groups of 4 or 8), chunks of any multiple
 * of 32 tokens up to 384 (the kernel walks chunks without dividing), 16-byte aligned tails
 * (the first batch's past 1024 tokens: two tail items), items of 1-4 chunks; fresh each run.
 * Each batch must take that kernel (unless KVTIER_CUDA_NO_MMA / KVTIER_CUDA_NO_EXACT_MMA) and
 * match the reference; the random batches cover the rest (f32, d256, tails one element off
 * alignment: the CUDA-core kernel). */
static void test_exact_mma_batches(void)
{
	int n = 16;
	const char *e = getenv("KVT_GPU_EXACT_BATCHES");
	if (e && *e)
		n = atoi(e);
	static const uint32_t ratios[] = {1, 2, 3, 4, 6, 8, 16};
	const double before = worst_gpu;
	const uint32_t x0 = kernel_count[KVT_CUDA_ATT_EXACT_MMA];
	const bool off = getenv("KVTIER_CUDA_NO_MMA") || getenv("KVTIER_CUDA_NO_EXACT_MMA");
	worst_gpu = 0.0;
	aligned_tails = true;
	for (int i = 0; i < n; i++) {
		struct kvt_codec_config cfg;
		random_config(&cfg, true);
		cfg.scheme = KVT_SCHEME_NONE;
		cfg.key_bits = cfg.value_bits = 16;
		cfg.rotate_v = 0;
		cfg.head_dim = kvt_rand_below(2) ? 128 : 64;
		cfg.dtype = kvt_rand_below(2) ? KVT_DTYPE_BF16 : KVT_DTYPE_F16;
		if (kvt_rand_below(2)) {
			cfg.group = 32;
			cfg.chunk_tokens = 32 * (1 + kvt_rand_below(12));
			if (cfg.n_sinks > cfg.chunk_tokens) /* at most B sinks */
				cfg.n_sinks = cfg.chunk_tokens;
		}
		max_tail = kvt_rand_below(4) == 0 ? 1100 : 0;
		long_tail = i == 0 ? 1025 : 0;
		char cpi[16];
		snprintf(cpi, sizeof(cpi), "%u", 1 + kvt_rand_below(4));
		setenv("KVTIER_CUDA_CPI", cpi, 1);
		one_batch(i, false, &cfg, ratios[kvt_rand_below(7)]);
	}
	aligned_tails = false;
	max_tail = long_tail = 0;
	const uint32_t got = kernel_count[KVT_CUDA_ATT_EXACT_MMA] - x0;
	printf("# worst relative error, scheme none f16 / bf16 d64 / d128 batches: gpu %.3e (%u of "
	       "%d on the exact rows' tensor-core kernel)\n", worst_gpu, got, n);
	KVT_CHECK(got == (off ? 0u : (uint32_t)n),
		  "the exact rows' tensor-core kernel takes these batches (%u of %d)", got, n);
	worst_gpu = worst_gpu > before ? worst_gpu : before;
}

/* Two GPUs (skipped with one): the same process attends on device 0 and device 1, the packed
 * kernel's head_dim-256 INT4 shapes among them (more than 48 KB of shared memory: an attribute
 * each device's copy of the kernel needs), with the other device made current between a
 * plan's build and its runs. */
static void test_second_device(void)
{
	if (kvt_cuda_device_count() < 2) {
		printf("# one device: the second-device batches are skipped\n");
		return;
	}
	char err[256];
	kvt_cuda_ctx *c1 = NULL, *c0 = ctx;
	KVT_REQUIRE(kvt_cuda_ctx_create(1, &c1, err, sizeof(err)) == 0, "device 1: %s", err);
	const double before = worst_gpu;
	const uint32_t m0 = kernel_count[KVT_CUDA_ATT_MMA];
	worst_gpu = 0.0;
	for (int i = 0; i < 8; i++) {
		struct kvt_codec_config cfg;
		random_config(&cfg, true);
		cfg.scheme = KVT_SCHEME_OSCAR;
		cfg.key_bits = cfg.value_bits = 4;
		cfg.head_dim = 256;
		cfg.dtype = KVT_DTYPE_BF16;
		cfg.rotate_v = 1;
		/* even i on device 1 with device 0 switched in before each run, odd the reverse */
		ctx = i % 2 ? c0 : c1;
		switch_ctx = i % 2 ? c1 : c0;
		one_batch(i, false, &cfg, 8);
	}
	ctx = c0;
	switch_ctx = NULL;
	const uint32_t got = kernel_count[KVT_CUDA_ATT_MMA] - m0;
	printf("# worst relative error, d256 INT4 batches on devices 0 and 1: gpu %.3e (%u of 8 on "
	       "the packed kernel)\n", worst_gpu, got);
	if (!getenv("KVTIER_CUDA_NO_MMA"))
		KVT_CHECK(got == 8, "the d256 INT4 batches take the packed kernel (%u of 8)", got);
	worst_gpu = worst_gpu > before ? worst_gpu : before;
	kvt_cuda_ctx_destroy(c1);
}

static void test_plan_errors(void)
{
	char err[256];
	struct kvt_codec_config cfg;
	kvt_codec_config_default(&cfg, 1, 2, 64, KVT_DTYPE_F16);
	kvt_cuda_attend_plan *pl = NULL;
	void *buf = NULL;
	KVT_REQUIRE(kvt_cuda_alloc(ctx, 4096, &buf, err, sizeof(err)) == 0, "alloc");
	struct kvt_cuda_attend_request r = {.cfg = &cfg, .layer = 0, .n_q_heads = 3,
					    .softmax_scale = 0.125f, .q_dev = buf,
					    .q_dtype = KVT_DTYPE_F16, .tail_k_dev = buf,
					    .tail_v_dev = buf, .n_tail = 1, .out_dev = buf};
	KVT_CHECK(kvt_cuda_attend_plan_build(ctx, &r, 1, &pl, err, sizeof(err)) == -EINVAL,
		  "n_q_heads 3 with 2 KV heads must be rejected");
	r.n_q_heads = 4;
	r.layer = 1;
	KVT_CHECK(kvt_cuda_attend_plan_build(ctx, &r, 1, &pl, err, sizeof(err)) == -EINVAL,
		  "layer 1 of 1 must be rejected");
	r.layer = 0;
	/* bit splits with 3 on one side are taken since session 4; the others are CPU-only */
	cfg.key_bits = 3;
	cfg.value_bits = 2;
	KVT_CHECK(kvt_cuda_attend_plan_build(ctx, &r, 1, &pl, err, sizeof(err)) == 0,
		  "key_bits 3 value_bits 2 must build: %s", err);
	kvt_cuda_attend_plan_destroy(pl);
	pl = NULL;
	cfg.key_bits = 2;
	cfg.value_bits = 4;
	KVT_CHECK(kvt_cuda_attend_plan_build(ctx, &r, 1, &pl, err, sizeof(err)) == -EOPNOTSUPP,
		  "key_bits 2 value_bits 4 is CPU-only");
	kvt_cuda_free(ctx, buf);
}

int main(void)
{
	kvt_test_init();
	if (kvt_cuda_device_count() == 0) {
		printf("# no CUDA device: skipped\n");
		return GPU_SKIP;
	}
	char err[256];
	if (kvt_cuda_ctx_create(0, &ctx, err, sizeof(err))) {
		printf("# no usable CUDA device (%s): skipped\n", err);
		return GPU_SKIP;
	}
	KVT_RUN(test_random_batches);
	KVT_RUN(test_fast_path_batches);
	KVT_RUN(test_k3_fast_batches);
	KVT_RUN(test_f16_fast_batches);
	KVT_RUN(test_k3_preset_batches);
	KVT_RUN(test_packed_mma_batches);
	KVT_RUN(test_hadamard_mma_batches);
	KVT_RUN(test_exact_mma_batches);
	KVT_RUN(test_second_device);
	KVT_RUN(test_plan_errors);
	printf("# plans with a chained INT2 kernel, early runs on: %u (each checked: its third run early, the "
	       "first two not)\n", n_chained);
	printf("# tail tokens folded into the INT2 kernel's coded items: %" PRIu64 " (%" PRIu64
	       " on tensor cores)\n", n_folded_tails, n_folded_tails_tc);
	kvt_cuda_ctx_destroy(ctx);
	return kvt_test_done();
}
