// A Rust program built with -C panic=abort, and two different bugs:
//   rustcrash index    an index out of bounds in parse_port()
//   rustcrash unwrap   an unwrap() on None in lookup_user()
use std::env;

#[inline(never)]
fn parse_port(fields: &[&str], which: usize) -> u16 {
    fields[which].parse().unwrap_or(0)
}

#[inline(never)]
fn load_config(text: &str) -> u16 {
    let fields: Vec<&str> = text.split(':').collect();
    parse_port(&fields, fields.len() + 2)
}

#[inline(never)]
fn lookup_user(users: &[(&str, u32)], name: &str) -> u32 {
    users.iter().find(|(n, _)| *n == name).map(|(_, id)| *id).unwrap()
}

fn main() {
    let mode = env::args().nth(1).unwrap_or_default();
    let users = [("root", 0), ("www-data", 33)];
    let value = match mode.as_str() {
        "index" => u32::from(load_config("localhost:8080")),
        "unwrap" => lookup_user(&users, "nobody"),
        _ => {
            eprintln!("usage: rustcrash index|unwrap");
            std::process::exit(2)
        }
    };
    println!("{}", value);
}
