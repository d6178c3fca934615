// The cbd-proxy subcommands.  Each takes its key=value parameters and
// returns the process exit status; configuration errors throw cbd::Error.
#pragma once

#include <string>
#include <vector>

#include "client/parameters.hpp"

namespace cbd::proxy {

extern const std::vector<ParameterSpec> kFormatParameters;
extern const std::vector<ParameterSpec> kListParameters;
extern const std::vector<ParameterSpec> kGcParameters;
extern const std::vector<ParameterSpec> kConnectParameters;
extern const std::vector<ParameterSpec> kDisconnectParameters;

int run_format(const Parameters& parameters);
int run_list(const Parameters& parameters, bool json);
int run_gc(const Parameters& parameters);
int run_connect(const Parameters& parameters);
int run_disconnect(const Parameters& parameters);

}  // namespace cbd::proxy
