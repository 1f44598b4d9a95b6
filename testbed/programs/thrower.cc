// An uncaught C++ exception: std::terminate, then abort().
#include <stdexcept>
#include <string>

__attribute__((noinline)) void parse_config(const std::string &path) {
    throw std::runtime_error("cannot parse " + path);
}

int main(int argc, char **argv) {
    parse_config(argc > 1 ? argv[1] : "/etc/app.conf");
    return 0;
}
