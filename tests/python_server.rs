//! Kernel test: a non-blocking Python asyncio server (the event-loop shape of uvicorn/vLLM's
//! API server: recvfrom/sendto on a non-blocking socket, EAGAIN in between) streaming SSE
//! over chunked encoding is traced like the synthetic one.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{kernel_tests_enabled, Agent};
use testbed::{CgroupDriver, LoadConfig, Pod, PodCgroup};

const SERVER_PY: &str = r#"
import asyncio, json
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":")[1])
            body = json.loads(await reader.readexactly(n))
            k = body.get("max_tokens", 4)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            await writer.drain()
            def chunk(obj):
                data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
                return b"%x\r\n%s\r\n" % (len(data), data)
            for i in range(k):
                await asyncio.sleep(0.002)
                writer.write(chunk({"choices": [{"index": 0, "delta": {"content": "tok%d" % i}}]}))
                await writer.drain()
            writer.write(chunk({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": k}}))
            writer.write(chunk(b"[DONE]") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", 8000)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"#;

#[test]
fn python_asyncio_server_is_traced() {
    if !kernel_tests_enabled("python_asyncio_server_is_traced") {
        return;
    }
    let pod = Pod::create("pyasync").unwrap();
    let cg = PodCgroup::create(CgroupDriver::Cgroupfs, "besteffort").unwrap();
    let mut cmd = Command::new("python3");
    cmd.args(["-c", SERVER_PY]);
    let _server = pod.spawn(cmd, Some(&cg)).unwrap();
    pod.wait_for_port(8000, Duration::from_secs(10)).unwrap();
    let agent = Agent::start(&["--no-auto", "--target-cgroup", cg.cgroup_path()]);
    let mut cfg = LoadConfig::new(pod.addr(8000));
    cfg.connections = 4;
    cfg.requests = 60;
    cfg.max_tokens = Some(5);
    let client = testbed::loadgen::run(&cfg).unwrap();
    assert!(
        client
            .iter()
            .all(|c| c.status == 200 && c.content_times().len() == 5),
        "python server answered"
    );
    let dst = format!("{}:8000", pod.ip());
    let recs = agent.wait_requests(Duration::from_secs(10), |r| {
        r.iter().filter(|x| x["dst"] == dst.as_str()).count() >= 60
    });
    let mine: Vec<_> = recs.iter().filter(|x| x["dst"] == dst.as_str()).collect();
    assert_eq!(mine.len(), 60);
    for r in &mine {
        assert_eq!(r["output_events"], 5, "{r}");
        assert_eq!(r["output_tokens"], 5, "{r}");
        assert_eq!(r["streaming"], true);
        assert!(
            r["ttft_ms"].as_f64().unwrap() > 1.5,
            "the first token waits 2 ms: {r}"
        );
        assert_eq!(r["itl_ms"].as_array().unwrap().len(), 4);
    }
}
