//! The transport's own tests: one exchange over pipes (a question on the agent's first line
//! answered on its stdin), what a node says cleaned and cut, answers of another protocol or shape.

use std::sync::{Arc, Mutex};

use super::*;

#[test]
fn clean_removes_control_characters_and_cuts_at_a_character_boundary() {
    assert_eq!(clean("a\u{1b}[2Jb\rc\u{7}\nd\te", 100, Keep::Start), "a[2Jbc\nd\te");
    assert_eq!(clean("ééééé", 6, Keep::Start), "é…");
    assert_eq!(clean("ééééé", 6, Keep::End), "…é");
    assert_eq!(clean(&"x".repeat(5000), 2000, Keep::End).len(), 2000);
}

/// An agent on the other end of pipes: reads the request line, says `first` (if any, in two
/// pieces), reads stdin to its end (unless `first` is its answer), then answers `last` with
/// the bytes it read.
async fn exchanged(
    input: Input,
    first: Option<&'static str>,
    then_read: bool,
) -> (Result<(), String>, String, Vec<u8>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (stdin, agent_in) = tokio::io::duplex(1 << 16);
    let (mut agent_out, stdout) = tokio::io::duplex(1 << 16);
    let (agent_err, stderr) = tokio::io::duplex(1 << 10);
    let agent = tokio::spawn(async move {
        let _stderr = agent_err; // closed when the agent ends
        let mut agent_in = tokio::io::BufReader::new(agent_in);
        let mut line = String::new();
        agent_in.read_line(&mut line).await.unwrap();
        if let Some(first) = first {
            // In two writes, apart: the line may come in pieces.
            let (head, tail) = first.split_at(first.len() / 2);
            agent_out.write_all(head.as_bytes()).await.unwrap();
            agent_out.flush().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            agent_out.write_all(format!("{tail}\n").as_bytes()).await.unwrap();
            agent_out.flush().await.unwrap();
        }
        let mut read = Vec::new();
        if then_read {
            agent_in.read_to_end(&mut read).await.unwrap();
            agent_out.write_all(br#"{"ok":true,"protocol":3,"last":true}"#).await.unwrap();
            agent_out.write_all(b"\n").await.unwrap();
        }
        read
    });
    let request = Request::Status { base: "/b".into() };
    let (sent, out, _) = exchange(&request, input, stdin, stdout, stderr).await.unwrap();
    (sent, String::from_utf8(out).unwrap(), agent.await.unwrap())
}

fn answering(reply: Result<Option<&'static [u8]>, &'static str>) -> (Input, Arc<Mutex<Vec<String>>>) {
    let heard = Arc::new(Mutex::new(Vec::new()));
    let told = heard.clone();
    let ask: Ask = Box::new(move |line| {
        told.lock().unwrap().push(String::from_utf8(line).unwrap());
        Box::pin(async move {
            match reply {
                Ok(Some(bytes)) => Ok(Some(futures::stream::iter([Ok(Bytes::from_static(bytes))]).boxed())),
                Ok(None) => Ok(None),
                Err(e) => Err(e.to_owned()),
            }
        })
    });
    (Input::Asked(ask), heard)
}

/// A question on the agent's first line is handed over as soon as it comes and answered on
/// its stdin, and is no part of its answer; a first line that is no question (a refusal) is
/// the answer, nothing sent; an agent that ends without a line does not hold the call; a
/// question the server cannot answer ends the call with why, stdin closed.
#[tokio::test]
async fn an_agent_asks_on_its_first_line_and_the_server_answers_on_its_stdin() {
    let question = r#"{"protocol":3,"lacking":{"frames":[1],"of":2}}"#;
    let (input, heard) = answering(Ok(Some(b"frame one")));
    let (sent, out, read) = exchanged(input, Some(question), true).await;
    assert_eq!(sent, Ok(()));
    assert_eq!(heard.lock().unwrap().as_slice(), [format!("{question}\n")]);
    assert_eq!(read, b"frame one");
    assert_eq!(out, "{\"ok\":true,\"protocol\":3,\"last\":true}\n", "the question is not the answer");

    let refusal = r#"{"ok":false,"protocol":3,"code":"locked","message":"busy"}"#;
    let (input, heard) = answering(Ok(None));
    let (sent, out, read) = exchanged(input, Some(refusal), false).await;
    assert_eq!((sent, out, read), (Ok(()), format!("{refusal}\n"), Vec::new()));
    assert_eq!(heard.lock().unwrap().len(), 1);

    let (input, heard) = answering(Ok(Some(b"never")));
    let (sent, out, _) = exchanged(input, None, false).await;
    assert_eq!((sent, out), (Ok(()), String::new()));
    assert!(heard.lock().unwrap().is_empty(), "no line, no question");

    let (input, _) = answering(Err("node n1: it said it lacks frame 9 of an artifact of 2 frames"));
    let (sent, _, read) = exchanged(input, Some(question), true).await;
    assert_eq!(sent, Err("node n1: it said it lacks frame 9 of an artifact of 2 frames".to_owned()));
    assert!(read.is_empty(), "nothing sent, stdin closed");
}

fn parsed(line: &str) -> Result<serde_json::Value, CallError> {
    parse_answer(format!("{line}\n").as_bytes(), b"", true, Ok(()))
}

#[test]
fn an_answer_of_another_protocol_or_none_is_not_read() {
    for (line, theirs) in [
        (r#"{"ok":true,"current":null,"ready":[],"unready":[]}"#, "none"),
        (r#"{"ok":true,"protocol":999,"current":null,"ready":[],"unready":[]}"#, "999"),
        (r#"{"ok":false,"protocol":"1","code":"locked","message":"x"}"#, "\"1\""),
    ] {
        let Err(e @ CallError::Foreign(_)) = parsed(line) else { panic!("{line} was read") };
        let why = e.to_string();
        assert!(why.contains(&format!("speaks protocol {theirs}, this server speaks protocol {VERSION}")), "{why}");
    }
    // An agent of a build before protocol 1: clap refuses the flag, nothing on stdout.
    let clap = b"error: unexpected argument '--protocol' found\n\nUsage: release node\n";
    let Err(e @ CallError::Foreign(_)) = parse_answer(b"", clap, false, Ok(())) else { panic!("not told apart") };
    assert!(e.to_string().starts_with(&format!("the node agent is older than protocol {VERSION} (it refused `--protocol`: error: unexpected argument '--protocol' found), this server")), "{e}");
    // Any other failure to start stays what it was.
    let Err(CallError::Transport(why)) = parse_answer(b"", b"sh: 1: release: not found", false, Ok(())) else {
        panic!("a missing agent read as a foreign one")
    };
    assert!(why.starts_with("the node agent failed: sh: 1: release: not found"), "{why}");
    let status: crate::node::protocol::Status =
        typed(parsed(r#"{"ok":true,"protocol":3,"current":null,"ready":[],"unready":[]}"#).unwrap()).unwrap();
    assert_eq!((status.current, status.plain), (None, false));
}

#[test]
fn an_answer_of_another_shape_is_a_failed_call_and_an_unknown_code_is_unknown() {
    // A status whose `current` is not a digest reads as nothing, never as "no release".
    let answer = parsed(r#"{"ok":true,"protocol":3,"current":"yesterday","ready":[],"unready":[]}"#).unwrap();
    let Err(CallError::Transport(why)) = typed::<crate::node::protocol::Status>(answer) else {
        panic!("a wrong shape was read")
    };
    assert!(why.contains("not of the shape this server reads"), "{why}");
    let Err(CallError::Node(e)) = parsed(r#"{"ok":false,"protocol":3,"code":"format_disk","message":"no"}"#) else {
        panic!("a refusal was read as an answer")
    };
    assert_eq!((e.code.as_str(), e.code.is_known(), e.message.as_str()), ("format_disk", false, "no"));
    let Err(CallError::Node(e)) = parsed(r#"{"ok":false,"protocol":3,"code":"fenced","message":"newer run"}"#) else {
        panic!("a refusal was read as an answer")
    };
    assert!(e.code.refused_before_switch());
}
