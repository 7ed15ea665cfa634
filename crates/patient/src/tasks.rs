//! `patient tasks`: list, show, cancel, redeliver and retry the tasks of a
//! running daemon.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use patient_client::{ListFilter, TaskState};

use crate::client_args::{self, client_help, DaemonArgs, Output, EXIT_OK};

const AFTER_HELP: &str = client_help!(
    "Examples:
  patient tasks list --state failed --limit 20
  patient tasks show tsk_0123456789abcdef0123456789abcdef
  patient tasks retry tsk_0123456789abcdef0123456789abcdef
  patient tasks list --callback SummarizeCallback --json | jq '.tasks[].id'

"
);

/// Arguments of `patient tasks`.
#[derive(Debug, Args)]
#[command(after_help = AFTER_HELP, subcommand_required = true, arg_required_else_help = true)]
pub(crate) struct TasksArgs {
    #[command(subcommand)]
    command: TasksCommand,

    #[command(flatten)]
    daemon: DaemonArgs,

    /// The output format.
    #[arg(
        short = 'o',
        long,
        value_name = "FORMAT",
        default_value = "table",
        global = true
    )]
    output: Output,

    /// Print the API's JSON (the same as --output json).
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum TasksCommand {
    /// List tasks, newest first, as a table of id, state, callback, created,
    /// attempts and delivery.
    #[command(after_help = AFTER_HELP)]
    List(ListArgs),
    /// Show one task: its fields, outcome, delivery and attempts.
    #[command(after_help = AFTER_HELP)]
    Show(IdArg),
    /// Cancel a task that has not finished (conflict, exit status 2, once it
    /// has).
    #[command(after_help = AFTER_HELP)]
    Cancel(IdArg),
    /// Deliver a finished task's outcome again, after a failed delivery.
    #[command(after_help = AFTER_HELP)]
    Redeliver(IdArg),
    /// Run a failed task again as a new series of attempts.
    #[command(after_help = AFTER_HELP)]
    Retry(IdArg),
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only tasks in this state: scheduled, queued, running, completed,
    /// failed or cancelled.
    #[arg(long, value_name = "STATE", value_parser = parse_state)]
    state: Option<TaskState>,

    /// Only tasks of this callback.
    #[arg(long, value_name = "NAME")]
    callback: Option<String>,

    /// At most this many tasks, 1 to 1000 (default: the daemon's, 100).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: Option<u32>,

    /// The next page: the cursor a previous list printed.
    #[arg(long, value_name = "CURSOR")]
    cursor: Option<String>,
}

#[derive(Debug, Args)]
struct IdArg {
    /// The task's id (`tsk_…`).
    #[arg(value_name = "ID")]
    id: String,
}

fn parse_state(text: &str) -> Result<TaskState, String> {
    text.parse()
}

pub(crate) fn run(args: TasksArgs) -> ExitCode {
    let output = if args.json { Output::Json } else { args.output };
    let client = match args.daemon.client() {
        Ok(client) => client,
        Err(message) => return client_args::usage(&message),
    };
    client_args::block_on(async move {
        let id = match &args.command {
            TasksCommand::List(list) => {
                let mut filter = ListFilter::new();
                filter.state = list.state;
                filter.callback = list.callback.clone();
                filter.limit = list.limit;
                filter.cursor = list.cursor.clone();
                return match client.list(&filter).await {
                    Ok(page) => {
                        match output {
                            Output::Json => client_args::print(&client_args::to_json_line(&page)),
                            Output::Outcome => {
                                for task in &page.tasks {
                                    client_args::print(&client_args::outcome_line(task));
                                }
                            }
                            Output::Table => {
                                let rows: Vec<Vec<String>> =
                                    page.tasks.iter().map(client_args::list_row).collect();
                                client_args::print(&client_args::table(
                                    &client_args::LIST_HEADERS,
                                    &rows,
                                ));
                                if let Some(cursor) = &page.next_cursor {
                                    eprintln!("patient: more tasks: --cursor {cursor}");
                                }
                            }
                        }
                        ExitCode::from(EXIT_OK)
                    }
                    Err(e) => client_args::fail(&e),
                };
            }
            TasksCommand::Show(IdArg { id })
            | TasksCommand::Cancel(IdArg { id })
            | TasksCommand::Redeliver(IdArg { id })
            | TasksCommand::Retry(IdArg { id }) => id.as_str(),
        };
        let result = match &args.command {
            TasksCommand::Cancel(_) => client.cancel(id).await,
            TasksCommand::Redeliver(_) => client.redeliver(id).await,
            TasksCommand::Retry(_) => client.retry(id).await,
            _ => client.get(id).await,
        };
        match result {
            Ok(task) => {
                client_args::print_task(&task, output);
                ExitCode::from(EXIT_OK)
            }
            Err(e) => client_args::fail(&e),
        }
    })
}
