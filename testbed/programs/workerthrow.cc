// An uncaught C++ exception thrown in a worker thread: std::terminate, then abort().
//   workerthrow          a std::invalid_argument from check_id(), inlined into validate_order()
//   workerthrow custom   an exception of the program's own type, which has no what()
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// inlined into validate_order: DWARF describes it, and the report shows it as an inline frame
static inline __attribute__((always_inline)) void check_id(int id) {
    if (id < 0) throw std::invalid_argument("order id must not be negative: " + std::to_string(id));
}

__attribute__((noinline)) void validate_order(int id) { check_id(id); }

namespace shop {
struct OrderRejected {
    int code;
};
}  // namespace shop

__attribute__((noinline)) void reject_order(int code) { throw shop::OrderRejected{code}; }

static bool custom = false;

__attribute__((noinline)) void process_orders() {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (custom) reject_order(409);
    validate_order(-7);
}

int main(int argc, char **argv) {
    custom = argc > 1 && std::string(argv[1]) == "custom";
    std::vector<std::thread> idle;
    for (int i = 0; i < 3; i++) idle.emplace_back([] { std::this_thread::sleep_for(std::chrono::seconds(10)); });
    std::thread worker(process_orders);
    worker.join();
    for (auto &t : idle) t.join();
    return 0;
}
