/*
 * kvt_cuda_enc.cuh - what the encoders of kvt_cuda_codec.cu (the byte-exact fe_kernel /
 * enc_kernel and the crc) and kvt_cuda_enc_mma.cu (the tensor-core encoder) share: the
 * per-chunk job descriptor and the kernel parameters kvt_cuda_encode fills once per call.
 */
#ifndef KVT_CUDA_ENC_CUH
#define KVT_CUDA_ENC_CUH

#include "cuda_internal.cuh"

#define MAX_GAPS 10

struct enc_job_dev {
	const void *k, *v;
	uint8_t *out;
	const uint8_t *hdr_src; /* header + pin table in device staging */
	uint32_t hdr_bytes;     /* data_offset */
	uint32_t n_pin;         /* sinks: chunk tokens 0..n_pin-1 */
	uint64_t layer_bytes;
	uint64_t total_bytes;
	uint64_t k_exact_off, v_exact_off;
	uint32_t n_gaps;
	uint32_t gap_off[MAX_GAPS], gap_len[MAX_GAPS];
	uint32_t crc_item0; /* the crc pass's first work item of this chunk (kvt_cuda_codec.cu) */
};

struct enc_params {
	const enc_job_dev *jobs;
	uint32_t *crc_acc;
	uint32_t *work_ctr; /* fe_kernel's value-unit counter, zeroed by enc_prep_kernel; the
			     * crc pass's counters follow it (CRC_SYNC_*) */
	uint32_t B, G, H, L, scheme, kb, vb, dtype, rotate_v, sbf, crc_field_off;
	uint32_t norms_off, k_scale_off, k_zero_off, v_scale_off, v_zero_off, k_codes_off,
		v_codes_off;
	float inv_sqrt_d;
};

/* The crc pass's synchronisation words, after fe_kernel's counter in work_ctr (zeroed by
 * enc_prep_kernel): the next unclaimed crc work item, and per chunk the tensor-core encoder
 * blocks finished (each bumped by the block's thread 0 after a barrier and a fence, i.e.
 * after all of the block's stores). */
#define CRC_SYNC_WORK 16
#define CRC_SYNC_JOB 64
#define CRC_SYNC_WORDS (CRC_SYNC_JOB + KVT_CUDA_MAX_JOBS)

/* The tensor-core encoder (kvt_cuda_enc_mma.cu): true when it takes cfg (oscar / kivi, f16 /
 * bf16, head_dim 64 or 128, G 32, 2- or 4-bit keys and values, the key tile of G x H x d in
 * shared memory); its launch, one block per (job, layer, key group). */
bool kvt_mx_supports(const struct kvt_codec_config *cfg);
cudaError_t kvt_mx_launch(const enc_params &p, uint32_t n_jobs, uint32_t head_dim,
			  cudaStream_t s);

#endif
