//! One call to one node as a phase of a deploy: the typed call, its report (outcome, output
//! tail, the shared files of a switch), and the quiet calls that are no phase of their own.

use super::*;

/// The release a switch request points `current` at.
pub(super) fn switching_to(request: &Request) -> Option<Digest> {
    match request {
        Request::Switch { digest, .. } => *digest,
        _ => None,
    }
}

/// Runs one phase on one node, reports it, and returns the answer or the reason.
pub(super) async fn phase<A: Answer>(
    plan: &Plan,
    target: &Target,
    name: Phase,
    request: Request,
    payload: Option<Payload>,
) -> Result<A, String> {
    let started = Timestamp::now();
    let answer = call::<A>(target, &request, payload.into()).await;
    report_phase(plan, target, name, &request, started, answer)
}

/// One call to the node's agent, its answer read as `A`.
pub(super) async fn call<A: Answer>(target: &Target, request: &Request, input: Input) -> Result<A, CallError> {
    target.transport.call(request, input).await.and_then(typed::<A>)
}

/// Reports one node's phase from the agent's answer; the answer, or the reason.
pub(super) fn report_phase<A: Answer>(
    plan: &Plan,
    target: &Target,
    name: Phase,
    request: &Request,
    started: Timestamp,
    answer: Result<A, CallError>,
) -> Result<A, String> {
    let mut shared_files = vec![];
    let (outcome, output, result) = match answer {
        Ok(answer) => {
            if let Some(digest) = switching_to(request)
                && digest == plan.release.digest
            {
                shared_files = asked_shared_files(&plan.service.shared, answer.shared());
                shared_files.iter_mut().for_each(|f| f.node = target.name.clone());
            }
            let output = answer.output().map(|o| clean(o, MAX_OUTPUT, Keep::End));
            (PhaseOutcome::Ok, output, Ok(answer))
        }
        Err(CallError::Node(e)) => {
            let output = Some(match &e.output {
                Some(out) => format!("{}\n{out}", e.message),
                None => e.message.clone(),
            });
            (PhaseOutcome::Failed, output, Err(format!("node {}: {name}: {} ({})", target.name, e.message, e.code)))
        }
        Err(e @ (CallError::Transport(_) | CallError::Foreign(_))) => {
            let e = e.to_string();
            (PhaseOutcome::Failed, Some(e.clone()), Err(format!("node {}: {name}: {e}", target.name)))
        }
    };
    plan.report.report(Deployment {
        node: target.name.clone(),
        phase: name,
        started_at: started,
        finished_at: Timestamp::now(),
        outcome,
        output_tail: output.filter(|o| !o.is_empty()),
        shared_files,
    });
    result
}

/// The shared files a node's switch answer names, only those the server asked about (each
/// once, in the order asked; the kinds are the protocol's): a node cannot fill the registry
/// with entries of its own making.
pub(super) fn asked_shared_files(asked: &[String], entries: &[SharedEntry]) -> Vec<SharedFile> {
    asked
        .iter()
        .filter_map(|path| {
            let entry = entries.iter().find(|e| &e.path == path)?;
            Some(SharedFile {
                node: String::new(),
                path: entry.path.clone(),
                kind: entry.kind.as_str().to_owned(),
                sha256: entry.sha256,
            })
        })
        .collect()
}

/// A call whose outcome is not a phase of its own (status).
pub(super) async fn phase_quiet<A: Answer>(target: &Target, request: Request) -> Result<A, String> {
    call::<A>(target, &request, Input::Nothing).await.map_err(|e| format!("node {}: {e}", target.name))
}

pub(super) fn first_error(results: Vec<Result<(), String>>) -> Option<String> {
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    match errors.len() {
        0 => None,
        1 => errors.into_iter().next(),
        n => Some(format!("{} (and {} more nodes failed)", errors[0], n - 1)),
    }
}
