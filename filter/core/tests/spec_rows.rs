//! The README's table "What the filter does", row by row, against the native tests that
//! specify each row (the tests run in their own files; this one checks the map): a row added
//! to the README without tests, or a test renamed or removed, fails here. A row whose flow is
//! partly still decided in the wasm adapter says which part (issue 16 moves them into the
//! core; the e2e suite covers them meanwhile).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// One README row: its first cell as the README writes it, the native tests specifying it
/// (`file::test`), and what of it is not yet decided in the core.
struct Row {
    request: &'static str,
    tests: &'static [&'static str],
    /// What of the row the adapter still decides, and the adapter functions doing it.
    in_adapter: Option<(&'static str, &'static [&'static str])>,
}

const ROWS: &[Row] = &[
    Row {
        request: "any upload request (`POST`, `PATCH`, `PUT` of `…/blobs/uploads/…`)",
        tests: &[
            "gateway_request::every_refusal_before_the_body_costs_the_key_service_nothing",
            "gateway_request::trailers_on_an_encrypted_write_are_refused",
            "spec_refusals::every_refusal_the_guide_quotes_is_provoked_with_its_status_code_and_message",
        ],
        in_adapter: None,
    },
    Row {
        request: "`POST /v2/<name>/blobs/uploads/`",
        tests: &[
            "gateway_request::key_service_refusal_and_wait",
            "gateway_request::a_session_is_named_as_the_gateway_named_it",
            "gateway_request::a_retry_after_401_is_decided_the_same",
        ],
        in_adapter: None,
    },
    Row {
        request: "`POST …/uploads/?mount=D&from=R`",
        tests: &[
            "gateway_request::docker_mount_attempts",
            "gateway_finish::a_mount_of_a_known_blob",
            "gateway_recording::a_mount_is_recorded_before_its_201",
        ],
        in_adapter: None,
    },
    Row {
        request: "`HEAD /v2/<name>/blobs/D`",
        tests: &[
            "gateway_request::head_dedupe",
            "gateway_request::head_reads_the_registrys_ledger_with_replicas",
            "gateway_ledger_cache::a_head_keeps_its_layer_in_the_cache",
            "gateway_finish::a_head_of_a_known_blob",
            "gateway_finish::known_blob_answers_are_checked_first",
        ],
        in_adapter: None,
    },
    Row {
        request: "`PATCH …/uploads/<id>`",
        tests: &[
            "gateway_request::skopeo_chunked_upload",
            "gateway_request::sealed_state_is_opened_and_stripped",
            "gateway_request::a_session_moved_from_another_replica_is_counted",
            "gateway_chunk_answer::a_202_saves_the_state_in_the_store_without_replicas",
            "gateway_chunk_answer::a_202_seals_the_state_into_the_location_with_replicas",
            "gateway_chunk_answer::a_range_other_than_what_was_sent_abandons_the_upload",
            "gateway_chunk_answer::an_answer_other_than_202_keeps_nothing",
            "gateway_body::patch_chunks_go_on_as_the_ciphertext_of_the_whole_however_cut",
            "gateway_body::the_first_window_is_held_until_it_decides",
            "gateway_body::blobs_are_told_apart_by_their_first_window",
            "gateway_body::a_blob_that_began_like_json_and_turns_binary_is_refused",
            "gateway_body::ciphertext_that_goes_on_as_plaintext_is_refused",
            "prefetch_planning::a_helped_stream_writes_the_local_ciphertext_and_the_tallies_add_up",
        ],
        in_adapter: None,
    },
    Row {
        request: "`PUT …/uploads/<id>?digest=D` (empty body)",
        tests: &[
            "gateway_request::skopeo_chunked_upload",
            "gateway_finish::a_bodiless_put_is_committed_on_the_registrys_201",
            "gateway_recording::a_bodiless_put_is_recorded_before_its_201",
            "gateway_recording::a_blob_is_recorded_in_three_stages_then_committed",
            "gateway_recording::a_failed_stage_refuses_the_request",
        ],
        in_adapter: None,
    },
    Row {
        request: "`PUT …?digest=D` with a body (monolithic: `ctr`, BuildKit, oras)",
        tests: &[
            "gateway_request::ctr_monolithic_put_becomes_a_patch",
            "gateway_body::a_monolithic_body_completes_with_the_clients_digest",
            "gateway_body::a_monolithic_body_of_another_digest_is_refused_at_its_end",
            "gateway_body::an_empty_body_forwards_nothing_and_completes_as_the_empty_blob",
            "gateway_finish::a_monolithic_body_is_finished_by_callout_and_answered_201",
            "gateway_finish::the_registrys_answer_to_a_monolithic_body",
            "gateway_finish::a_202_before_the_body_ended_abandons_the_session",
            "gateway_finish::the_finishing_put_refused",
            "gateway_finish::a_finishing_put_not_dispatched_is_refused",
            "gateway_finish::a_json_blob_is_committed_as_pushed",
            "gateway_finish::with_replicas_the_finishing_201_starts_the_recording",
        ],
        in_adapter: None,
    },
    Row {
        request: "`POST …/uploads/?digest=D` with a body",
        tests: &[
            "gateway_request::post_with_digest_opens_a_session_by_callout",
            "gateway_request::post_with_digest_session_failures",
            "gateway_request::post_with_digest_without_body",
            "gateway_challenge::a_401_to_the_session_callout_carries_the_registrys_challenge",
        ],
        in_adapter: None,
    },
    Row {
        request: "`PUT /v2/<name>/manifests/<tag>`",
        tests: &[
            "gateway_request::manifest_puts",
            "gateway_manifest::a_manifest_by_tag_is_rewritten_and_answered_in_the_clients_digest",
            "gateway_manifest::manifest_refusals_at_the_end_of_the_body",
            "gateway_manifest::a_body_over_the_limit_is_dropped_as_it_comes_and_refused_at_its_end",
            "gateway_manifest::with_replicas_unknown_digests_are_read_from_the_registrys_ledger",
            "gateway_manifest::with_replicas_a_forged_record_or_too_many_lookups_refuse_the_push",
            "manifest_rewrite::rewrites_table",
            "manifest_rewrite::refusals_table",
            "manifest_allowlist::layer_rule_table",
            "index_rewrite::rewrites_table",
        ],
        in_adapter: None,
    },
    Row {
        request: "`PUT /v2/<name>/manifests/sha256:D` (index children, referrers)",
        tests: &[
            "gateway_manifest::an_index_after_its_children_pushed_by_digest",
            "gateway_manifest::registry_answers_to_a_manifest_stored_by_digest",
            "gateway_manifest::with_replicas_a_manifest_stored_by_digest_is_recorded_before_the_answer",
            "gateway_manifest::a_referrer_pushed_by_digest_is_stored_under_its_reserved_tag",
            "index_rewrite::children_then_index_flow",
            "index_rewrite::pushed_digest_must_match_the_body",
            "manifest_artifacts::referrers_rewritten",
        ],
        in_adapter: None,
    },
    Row {
        request: "`GET /v2/<name>/tags/list`",
        tests: &[
            "gateway_tags_list::answers_lose_their_reserved_tags_and_nothing_else",
            "gateway_tags_list::answers_that_are_not_a_tags_list_are_not_read",
            "gateway_tags_list::a_client_following_link_sees_every_user_tag_once_and_no_empty_page",
            "gateway_tags_list::the_gateway_reads_the_list_and_answers_without_reserved_tags",
            "gateway_tags_list::a_page_of_reserved_tags_only_is_skipped_for_the_next",
            "gateway_tags_list::answers_the_gateway_does_not_show_go_to_the_client_from_the_registry",
            "gateway_tags_list::only_reads_of_encrypted_repositories_are_read_by_the_gateway",
            "gateway_tags_list::an_answer_over_the_limit_is_refused_never_shown_with_reserved_tags",
        ],
        in_adapter: None,
    },
    Row {
        request: "`DELETE /v2/<name>/manifests/sha256:D`",
        tests: &[
            "gateway_request::manifest_delete_by_digest",
            "gateway_delete_check::a_token_that_may_delete_but_not_read_deletes_nothing",
            "gateway_delete_check::a_failed_check_read_deletes_nothing",
        ],
        in_adapter: None,
    },
    Row {
        request: "every registry answer to these",
        tests: &[
            "gateway_request::post_with_digest_session_failures",
            "gateway_manifest::registry_answers_to_a_manifest_push",
            "gateway_manifest::answers_to_requests_the_gateway_does_not_act_on_pass",
        ],
        in_adapter: None,
    },
];

/// The first cells of the README's table, in order.
fn readme_rows() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let start = readme.find("## What the filter does").unwrap();
    readme[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .next()
                .unwrap()
                .trim()
                .to_string()
        })
        .collect()
}

/// Whether `tests/<file>.rs` has a test named `name`.
fn test_exists(spec: &str) -> bool {
    let (file, name) = spec.split_once("::").unwrap();
    let path = format!("{}/tests/{file}.rs", env!("CARGO_MANIFEST_DIR"));
    let Ok(source) = std::fs::read_to_string(path) else {
        return false;
    };
    let mut lines = source.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "#[test]" {
            if let Some(next) = lines.next() {
                if next.trim_start().starts_with(&format!("fn {name}(")) {
                    return true;
                }
            }
        }
    }
    false
}

#[test]
fn every_row_of_the_readme_table_has_native_tests() {
    let rows = readme_rows();
    assert!(
        rows.len() >= 10,
        "the README's table was not read: {rows:?}"
    );
    let mut problems = Vec::new();
    for row in &rows {
        if !ROWS.iter().any(|r| r.request == row) {
            problems.push(format!("README row {row:?} has no tests here"));
        }
    }
    for row in ROWS {
        if !rows.iter().any(|r| r == row.request) {
            problems.push(format!("{:?} is no row of the README's table", row.request));
        }
        for test in row.tests {
            if !test_exists(test) {
                problems.push(format!("{:?}: no test {test}", row.request));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The adapter functions a row names still exist: once a flow has moved into the core, its row
/// here must say so (and gain the native tests of the moved part).
#[test]
fn what_the_adapter_still_decides_is_there() {
    let adapter = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../wasm/src"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .collect::<String>();
    for row in ROWS {
        for function in row.in_adapter.map_or(&[][..], |(_, f)| f) {
            assert!(
                adapter.contains(&format!("fn {function}(")),
                "{:?}: the adapter has no {function} any more; say what moved",
                row.request
            );
        }
    }
}
