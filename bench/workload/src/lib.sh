greet() {
  printf 'hello from %s on %s\n' "$1" "$(uname -m)"
}
