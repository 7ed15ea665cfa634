//! The tools `scripts/services.sh start` prepares for tests, found through
//! the variables it prints.

/// The Python of the tools venv (`PATIENT_TEST_PYTHON`: `openai`,
/// `standardwebhooks`), or `None` with a notice naming `purpose`; with
/// `PATIENT_REQUIRE_SERVICES=1` a missing Python fails the test instead.
pub fn test_python(purpose: &str) -> Option<String> {
    match std::env::var("PATIENT_TEST_PYTHON") {
        Ok(py) if !py.is_empty() => Some(py),
        _ => {
            let hint = "prepare it with `eval \"$(scripts/services.sh start)\"`";
            assert!(
                std::env::var("PATIENT_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "{purpose} needs PATIENT_TEST_PYTHON (PATIENT_REQUIRE_SERVICES=1); {hint}"
            );
            eprintln!("notice: skipping {purpose}: PATIENT_TEST_PYTHON is not set; {hint}");
            None
        }
    }
}
