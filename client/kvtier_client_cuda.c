/*
 * kvtier_client_cuda.c - kvt_client_restore_to_device_ptr: exports the worker's allocations
 * through kernels/kvt_cuda.h (plain C; no CUDA header here) and sends RestoreToDevice.
 * Compiled into libkvtier only when the CUDA kernels library is built
 * (KVT_CLIENT_HAVE_CUDA); kvtier_client.c has the stub otherwise.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "kvt_cuda.h"
#include "kvtier_client.h"

int kvt_client_restore_to_device_ptr(struct kvt_client *c, const struct kvt_client_restore *r,
				     const void *k_dev, const void *v_dev,
				     struct kvt_client_restore_result *res,
				     struct kvt_client_status *st)
{
	uint8_t hk[KVT_CUDA_IPC_HANDLE_BYTES], hv[KVT_CUDA_IPC_HANDLE_BYTES];
	uint64_t ko = 0, kb = 0, vo = 0, vb = 0;
	char err[256] = "";
	struct kvt_client_restore q = *r;
	int rc = kvt_cuda_ipc_export(k_dev, hk, &ko, &kb, err, sizeof err);
	if (rc == 0 && v_dev)
		rc = kvt_cuda_ipc_export(v_dev, hv, &vo, &vb, err, sizeof err);
	if (rc) {
		if (st) {
			memset(st, 0, sizeof *st);
			st->code = rc == -ENODEV ? KVT_CODE_FAILED_PRECONDITION
						 : KVT_CODE_INVALID_ARGUMENT;
			st->local = 1;
			snprintf(st->message, sizeof st->message, "exporting the %s buffer: %s",
				 v_dev && kb ? "V" : "K", err);
		}
		return rc;
	}
	q.ipc_mem_handle = hk;
	q.ipc_mem_handle_bytes = sizeof hk;
	q.k_offset_bytes = ko;
	q.buffer_bytes = kb;
	if (v_dev) {
		if (memcmp(hk, hv, sizeof hk) != 0) {
			q.ipc_mem_handle_v = hv;
			q.ipc_mem_handle_v_bytes = sizeof hv;
		} else {
			q.ipc_mem_handle_v = NULL;
			q.ipc_mem_handle_v_bytes = 0;
		}
		q.v_offset_bytes = vo;
		if (vb > q.buffer_bytes)
			q.buffer_bytes = vb;
	} else {
		q.ipc_mem_handle_v = NULL;
		q.ipc_mem_handle_v_bytes = 0;
		q.v_offset_bytes = ko + r->v_offset_bytes;
	}
	return kvt_client_restore_to_device(c, &q, res, st);
}
