//! HTTPS upstreams: rustls with SNI against a backend whose certificate comes from a private
//! CA (generated here with openssl); trusted only through `tls_ca_file`.

mod common;

use common::*;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a server certificate for 127.0.0.1 signed by it. Returns the folder.
fn make_certs() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-tls-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &dir,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=switchyard-test-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ],
        ]
        .concat(),
    );
    openssl(
        &dir,
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n").unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    dir
}

/// A minimal HTTPS backend on std threads: answers every POST with a chat completion.
fn tls_backend(dir: &Path) -> std::net::SocketAddr {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut reader = BufReader::new(rustls::StreamOwned::new(conn, tcp));
                loop {
                    let mut length = 0usize;
                    let mut authorized = false;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                        authorized |= lower.starts_with("authorization: bearer sk-tls-test");
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0u8; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let answer = format!(
                        r#"{{"id":"x","object":"chat.completion","model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"over tls, key sent: {authorized}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}}}"#
                    );
                    let out = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}", answer.len());
                    let stream = reader.get_mut();
                    if stream
                        .write_all(out.as_bytes())
                        .and_then(|_| stream.flush())
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn config(addr: std::net::SocketAddr, ca: Option<&Path>) -> String {
    let ca = ca.map_or(String::new(), |p| {
        format!("tls_ca_file = \"{}\"\n", p.display())
    });
    format!(
        "[health]\ninterval_ms = 0\n[[backends]]\nname = \"secure\"\nurl = \"https://{addr}\"\napi_key_env = \"SWITCHYARD_TEST_TLS_KEY\"\n{ca}models = [{{ name = \"m\" }}]\n[[tiers]]\nname = \"only\"\ntargets = [\"secure/m\"]\n"
    )
}

#[test]
fn https_backend_with_private_ca() {
    if Command::new("openssl").arg("version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install the openssl command"
        );
        eprintln!("skipped: the openssl command (which makes the test's CA) is not installed");
        return;
    }
    // The router reads the key from its environment; the test process passes it on.
    std::env::set_var("SWITCHYARD_TEST_TLS_KEY", "sk-tls-test");
    let dir = make_certs();
    let addr = tls_backend(&dir);
    let trusted = router(&config(addr, Some(&dir.join("ca.pem"))));
    let mut c = Conn::open(trusted.addr);
    for _ in 0..3 {
        // Several requests on one client connection reuse the pooled TLS connection.
        c.send(&post_raw("/v1/chat/completions", &chat("hi"), ""));
        let resp = c.read_response().unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(
            resp.json()["choices"][0]["message"]["content"],
            "over tls, key sent: true"
        );
    }
    // Without the CA the certificate is not trusted: the handshake fails, nothing is sent.
    let untrusted = router(&config(addr, None));
    let resp = post(untrusted.addr, "/v1/chat/completions", &chat("hi"), "");
    let e = resp.error(502);
    assert_eq!(e["code"], "upstream_connect_failed");
    let message = e["message"].as_str().unwrap();
    // And why: the issuer is unknown.
    assert!(
        message.contains("TLS handshake") && message.contains("UnknownIssuer"),
        "{message}"
    );
    assert!(
        !message.contains("sk-tls-test"),
        "the key never appears in errors"
    );
}
