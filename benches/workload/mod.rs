//! Ring-buffer records of streaming chat completions, built in memory exactly as the BPF side
//! submits them (vLLM-shaped: one chunked SSE event per write) over several keep-alive
//! connections, interleaved by time as the ring buffer would deliver them. Shared by the
//! pipeline bench and `tests/alloc.rs`.

use llm_slo_agent::skel::l7::types::llmslo_event_hdr;

/// Keep-alive connections open at once, requests per connection, content events per request.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub conns: usize,
    pub reqs_per_conn: usize,
    pub tokens: usize,
}

const KIND_ACCEPT: u16 = 1;
const KIND_READ: u16 = 2;
const KIND_WRITE: u16 = 3;
const KIND_CLOSE: u16 = 4;
const HEAD_CAP: usize = 4096;
const TAIL_CAP: usize = 512;

/// One event before serialisation.
struct Ev {
    ts: u64,
    conn: usize,
    kind: u16,
    ret: i64,
    queued_ts: u64,
    payload: Vec<u8>,
}

/// Serialises one record exactly as the BPF side submits it: the header, then the copied
/// head bytes and tail bytes (`bpf_ringbuf_output(.., sizeof(hdr) + n, ..)`).
fn raw(ev: &Ev) -> Vec<u8> {
    let n = ev.payload.len();
    let (head, tail): (&[u8], &[u8]) = if n <= HEAD_CAP {
        (&ev.payload, &[])
    } else {
        (
            &ev.payload[..HEAD_CAP],
            &ev.payload[n - TAIL_CAP.min(n - HEAD_CAP)..],
        )
    };
    let mut h = llmslo_event_hdr {
        ts_enter: ev.ts,
        ts_exit: ev.ts + 4_000,
        sock_id: 0xffff_8881_0a3c_0000 + (ev.conn as u64) * 0x1000,
        queued_ts: ev.queued_ts,
        cgroup_id: 4242,
        ret: ev.ret,
        tgid: 3100,
        tid: 3100 + (ev.conn as u32 % 4),
        fd: 20 + ev.conn as u32,
        head_len: head.len() as u32,
        tail_len: tail.len() as u32,
        kind: ev.kind,
        family: 2,
        lport: 8000,
        rport: 40_000 + ev.conn as u16,
        ..Default::default()
    };
    h.laddr[..4].copy_from_slice(&[10, 200, 0, 2]);
    h.raddr[..4].copy_from_slice(&[10, 200, 0, 1]);
    for (d, s) in h.comm.iter_mut().zip(b"python3") {
        *d = *s as _;
    }
    // SAFETY: reading the bytes of a plain repr(C) value (`plain::Plain` is implemented for
    // it in src/ringbuf.rs).
    let bytes = unsafe { plain::as_bytes(&h) };
    [bytes, head, tail].concat()
}

/// A ~600-byte streaming chat completion request, as an OpenAI client sends it.
fn request(conn: usize, i: usize, tokens: usize) -> Vec<u8> {
    let prompt = "Summarise the following paragraph about distributed inference serving in three \
                  sentences, keeping every number exact. The cluster runs eight replicas behind \
                  a load balancer and each replica batches up to sixty-four sequences.";
    let body = format!(
        r#"{{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"{prompt}"}}],"stream":true,"stream_options":{{"include_usage":true}},"max_tokens":{tokens},"temperature":0.7}}"#
    );
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 10.200.0.2:8000\r\nUser-Agent: OpenAI/Python 1.54.3\r\n\
         Accept: application/json\r\nContent-Type: application/json\r\nx-request-id: {conn}-{i}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ndate: Tue, 04 Nov 2025 10:00:00 GMT\r\nserver: uvicorn\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n";

/// One SSE event as one HTTP chunk (one write, like vLLM behind uvicorn).
fn chunk(event: &str) -> Vec<u8> {
    let mut c = format!("{:x}\r\n", event.len()).into_bytes();
    c.extend_from_slice(event.as_bytes());
    c.extend_from_slice(b"\r\n");
    c
}

/// The events of one connection: accept, then per request a read, the response head, a
/// role chunk, `shape.tokens` content chunks, the usage chunk, `[DONE]` and the terminator; close.
fn connection(shape: Shape, conn: usize, start: u64) -> Vec<Ev> {
    let mut out = Vec::new();
    let mut t = start;
    let mut push = |t: u64, kind: u16, queued_ts: u64, payload: Vec<u8>| {
        let ret = if matches!(kind, KIND_READ | KIND_WRITE) {
            payload.len() as i64
        } else {
            (20 + conn) as i64
        };
        out.push(Ev {
            ts: t,
            conn,
            kind,
            ret,
            queued_ts,
            payload,
        });
    };
    push(t, KIND_ACCEPT, 0, Vec::new());
    let token = chunk(
        "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok\"}}]}\n\n",
    );
    let role = chunk(
        "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
    );
    let usage = chunk(&format!(
        "data: {{\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{{\"prompt_tokens\":112,\"total_tokens\":{},\"completion_tokens\":{}}}}}\n\n",
        112 + shape.tokens,
        shape.tokens
    ));
    let done = chunk("data: [DONE]\n\n");
    for i in 0..shape.reqs_per_conn {
        t += 3_000_000 + (conn as u64 * 137_000); // think time between requests
        let queued = t;
        t += 40_000;
        push(t, KIND_READ, queued, request(conn, i, shape.tokens));
        t += 60_000_000; // queue + prefill
        push(t, KIND_WRITE, 0, RESPONSE_HEAD.to_vec());
        t += 50_000;
        push(t, KIND_WRITE, 0, role.clone());
        for k in 0..shape.tokens {
            t += 18_000_000 + (k as u64 % 7) * 300_000; // decode steps
            push(t, KIND_WRITE, 0, token.clone());
        }
        t += 100_000;
        push(t, KIND_WRITE, 0, usage.clone());
        t += 20_000;
        push(t, KIND_WRITE, 0, done.clone());
        t += 10_000;
        push(t, KIND_WRITE, 0, b"0\r\n\r\n".to_vec());
    }
    t += 5_000_000;
    push(t, KIND_CLOSE, 0, Vec::new());
    out
}

/// All connections' records, merged in time order as the ring buffer delivers them.
pub fn workload(shape: Shape) -> Vec<Vec<u8>> {
    let mut evs: Vec<Ev> = (0..shape.conns)
        .flat_map(|c| connection(shape, c, 1_000_000_000 + c as u64 * 11_000_000))
        .collect();
    evs.sort_by_key(|e| (e.ts, e.conn));
    evs.iter().map(raw).collect()
}
