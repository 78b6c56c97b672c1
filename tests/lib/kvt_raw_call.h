/*
 * kvt_raw_call.h - one unary gRPC call through the C core with raw request bytes: the daemon
 * tests' harness (tests/daemon/daemon_harness.h) and test_bad_input's hand-written requests.
 */
#ifndef KVT_RAW_CALL_H
#define KVT_RAW_CALL_H

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/support/time.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * One unary call on ch with the request's bytes as given (also what libkvtier would never
 * send), waited for on cq (a pluck queue). wait_ready makes the call wait (up to timeout_ms)
 * for the server's socket to come up instead of failing fast. Returns the status code;
 * *resp (malloc'd) and *resp_len get the reply (resp may be NULL); details (if non-NULL) the
 * message.
 */
static grpc_status_code kvt_raw_unary(grpc_channel *ch, grpc_completion_queue *cq,
				      const char *method, const void *req, size_t req_len,
				      uint8_t **resp, size_t *resp_len, char *details, size_t dlen,
				      int wait_ready, int timeout_ms)
{
	gpr_timespec dl = gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
				       gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
	grpc_slice m = grpc_slice_from_copied_string(method);
	grpc_call *call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, m,
						   NULL, dl, NULL);
	grpc_slice_unref(m);
	grpc_slice rs = grpc_slice_from_copied_buffer(req, req_len);
	grpc_byte_buffer *send = grpc_raw_byte_buffer_create(&rs, 1);
	grpc_slice_unref(rs);
	grpc_byte_buffer *recv = NULL;
	grpc_metadata_array imd, tmd;
	grpc_metadata_array_init(&imd);
	grpc_metadata_array_init(&tmd);
	grpc_status_code status = GRPC_STATUS_UNKNOWN;
	grpc_slice sd = grpc_empty_slice();
	grpc_op ops[6];
	memset(ops, 0, sizeof ops);
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[0].flags = wait_ready ? GRPC_INITIAL_METADATA_WAIT_FOR_READY : 0;
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = send;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[3].data.recv_initial_metadata.recv_initial_metadata = &imd;
	ops[4].op = GRPC_OP_RECV_MESSAGE;
	ops[4].data.recv_message.recv_message = &recv;
	ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	ops[5].data.recv_status_on_client.trailing_metadata = &tmd;
	ops[5].data.recv_status_on_client.status = &status;
	ops[5].data.recv_status_on_client.status_details = &sd;
	void *tag = (void *)call;
	if (grpc_call_start_batch(call, ops, 6, tag, NULL) == GRPC_CALL_OK)
		grpc_completion_queue_pluck(cq, tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
	if (resp) {
		*resp = NULL;
		*resp_len = 0;
	}
	if (recv && resp) {
		grpc_byte_buffer_reader r;
		grpc_byte_buffer_reader_init(&r, recv);
		grpc_slice all = grpc_byte_buffer_reader_readall(&r);
		grpc_byte_buffer_reader_destroy(&r);
		*resp_len = GRPC_SLICE_LENGTH(all);
		*resp = malloc(*resp_len ? *resp_len : 1);
		memcpy(*resp, GRPC_SLICE_START_PTR(all), *resp_len);
		grpc_slice_unref(all);
	}
	if (details) {
		snprintf(details, dlen, "%.*s", (int)GRPC_SLICE_LENGTH(sd),
			 (const char *)GRPC_SLICE_START_PTR(sd));
	}
	if (recv)
		grpc_byte_buffer_destroy(recv);
	grpc_byte_buffer_destroy(send);
	grpc_slice_unref(sd);
	grpc_metadata_array_destroy(&imd);
	grpc_metadata_array_destroy(&tmd);
	grpc_call_unref(call);
	return status;
}

#endif
