//! `keyward`, the admin and scripting command line of `keywardd`: a thin front end over the
//! client library; everything lives in [`cli`].

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
